"""The main job runs end to end on CPU and reports a number, or a reason, for every contender."""

import json
import math

import pytest

from benchmarks import step_time
from benchmarks.contenders import CONTENDERS

ROW_KEYS = {"median_ms", "min_ms", "max_ms", "samples", "bytes_per_elem", "two_pass_roofline", "launches", "host_ms",
            "peak_extra_mib", "graph_replay_ms", "speedup_vs_apex"}  # fmt: skip


def test_benchmark_smoke(tmp_path):
    doc = step_time.main(["--device", "cpu", "--sets", "faster_rcnn_r50_fpn", "many_small", "--limit", "6",
                          "--warmup", "1", "--steps", "1", "--rounds", "2", "--out", str(tmp_path)])  # fmt: skip
    (written,) = tmp_path.glob("*.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(doc))
    assert list(tmp_path.glob("*.png"))
    meta = doc["meta"]
    assert meta["device"] == "cpu" and meta["copy_bandwidth_GBps"] > 0 and meta["torch"]
    assert [(r["set"], r["dtype"]) for r in doc["results"]] == [("faster_rcnn_r50_fpn", "float32"),
                                                                ("many_small", "float32")]  # fmt: skip
    for result in doc["results"]:
        assert result["tensors"] == 6 and result["params"] > 0
        # every contender has a row with numbers, or a reason
        assert set(result["rows"]) | set(result["skipped"]) == {c.name for c in CONTENDERS}
        assert not set(result["rows"]) & set(result["skipped"])
        assert all(isinstance(reason, str) and reason for reason in result["skipped"].values())
        assert {"pmdlamb[torch]", "reference loop", "torch fused AdamW"} <= set(result["rows"])
        for name, row in result["rows"].items():
            assert set(row) >= ROW_KEYS, name
            assert row["samples"] == 2
            for key in ("median_ms", "min_ms", "max_ms", "bytes_per_elem", "two_pass_roofline", "host_ms"):
                assert math.isfinite(row[key]) and row[key] > 0, (name, key)
            assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            # derived consistently from the same run's copy bandwidth
            expected = row["median_ms"] / 1e3 * meta["copy_bandwidth_GBps"] * 1e9 / result["params"]
            assert row["bytes_per_elem"] == pytest.approx(expected)


def test_parameter_sets_match_the_models():
    # Counts of torchvision's fasterrcnn/maskrcnn_resnet50_fpn (BatchNorm parameters included),
    # Hugging Face's BertForPreTraining (bert-large: BertModel's well-known 335,141,888 plus the pre-training
    # heads, 1,084,220), and the generated small-tensor set.
    expected = {"faster_rcnn_r50_fpn": (189, 41_808_406), "mask_rcnn_r50_fpn": (201, 44_454_513),
                "bert_large": (398, 336_226_108), "many_small": (2000, None)}  # fmt: skip
    for name, (tensors, params) in expected.items():
        shapes = step_time.load_shapes(name)
        assert len(shapes) == tensors
        if params is not None:
            assert sum(math.prod(s) for s in shapes) == params
    assert all(1 <= s[0] <= 10_000 for s in step_time.load_shapes("many_small"))
