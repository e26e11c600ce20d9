"""The torchrun example trains a torchvision detector with the recipe on 2 CPU ranks (gloo)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_example_trains_under_torchrun():
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "train_detection.py"), "--iters", "3", "--image-size", "96", "--warmup-iters", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 ranks x 2 images, lr 0.1" in proc.stdout  # linear scaling: 0.4 · 4 / 16
    rows = re.findall(r"iter +(\d+) +loss ([\d.eE+-]+|nan|inf) +lr ([\d.eE+-]+)", proc.stdout)
    assert [int(r[0]) for r in rows] == [0, 1, 2], proc.stdout
    assert all(math.isfinite(float(r[1])) for r in rows), proc.stdout
    # Warm-up from 0.1·lr over 2 iterations, then the full rate until the first milestone (iteration 2).
    assert [float(r[2]) for r in rows[:2]] == pytest.approx([0.01, 0.055])
