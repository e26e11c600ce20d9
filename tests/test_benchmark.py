"""The main job and the host-overhead benchmark run end to end on CPU and report a number, or a reason, for
every contender."""

import itertools
import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import host_overhead, mixed_precision, step_time
from benchmarks.contenders import CONTENDERS
from conftest import CPU_BACKENDS

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"median_ms", "min_ms", "max_ms", "samples", "bytes_per_elem", "two_pass_roofline", "launches", "host_ms",
            "peak_extra_mib", "graph_replay_ms", "speedup_vs_apex"}  # fmt: skip


def test_benchmark_smoke(tmp_path, capsys):
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
        if not torch.cuda.is_available():  # said as a reader needs it, not as the dispatcher does
            assert result["skipped"]["pmdlamb[cuda]"] == "no GPU here: the cuda backend runs on CUDA devices"
            assert result["skipped"]["apex FusedLAMB"] == "no GPU here: apex FusedLAMB runs on CUDA devices only"
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
    out, err = capsys.readouterr()
    # Only the columns that apply off the GPU, each explained under its table; progress goes to stderr.
    lines = out.splitlines()
    heads = [(line.split(), lines[i + 1].split()) for i, line in enumerate(lines) if line.startswith("contender")]
    assert heads == [(["contender", "median", "min", "max", "bytes", "per", "%", "of", "40B"],
                      ["ms", "element", "roofline"])] * 2  # fmt: skip
    assert out.count("  % of 40B roofline: the time 40 B/elem takes at copy bandwidth") == 2
    assert out.count(f"  {step_time.CPU_ROOFLINE}") == 2
    assert "launches" not in out and "vs apex" not in out
    assert "faster_rcnn_r50_fpn float32" in err and "many_small float32" in err and "torch fused AdamW" in err


def test_runs_never_overwrite_each_other_and_land_where_git_ignores_them(tmp_path, capsys):
    args = ["--device", "cpu", "--sets", "many_small", "--limit", "3", "--warmup", "0", "--steps", "1", "--rounds", "1",
            "--contenders", "pmdlamb[torch]", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    first, second = step_time.main(args), step_time.main(args)
    stem = step_time.file_stem(first["meta"])
    assert {p.name for p in tmp_path.iterdir()} == {f"{stem}{n}.{ext}" for n in ("", "-2") for ext in ("json", "png")}
    assert json.loads((tmp_path / f"{stem}-2.json").read_text()) == json.loads(json.dumps(second))
    assert f"wrote {tmp_path / stem}-2.json" in capsys.readouterr().out
    ignored = subprocess.run(["git", "check-ignore", "-q", str(step_time.RUNS_DIR / f"{stem}.json")], cwd=ROOT)
    assert ignored.returncode == 0 and step_time.RUNS_DIR != step_time.RESULTS_DIR


def _fused_adamw_row(monkeypatch, seconds):
    """The table row of torch's fused AdamW, raced alone, its i-th step sleeping seconds(i) first."""
    calls = itertools.count()
    step = torch.optim.AdamW.step

    def sleepy(self, *args, **kwargs):
        time.sleep(seconds(next(calls)))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", sleepy)
    doc = step_time.main(["--device", "cpu", "--sets", "many_small", "--limit", "3", "--warmup", "1", "--steps", "3",
                          "--rounds", "2", "--contenders", "torch fused AdamW", "--quiet", "--no-files"])  # fmt: skip
    (row,) = doc["results"][0]["rows"].values()
    return row


def test_a_contender_whose_rounds_vary_is_flagged_and_a_quiet_one_is_not(capsys, monkeypatch):
    row = _fused_adamw_row(monkeypatch, lambda i: 0.05 if i % 3 == 2 else 0)  # a busy machine, one step in three
    assert row["noisy"] and row["max_ms"] > step_time.NOISY_MAX_OVER_MIN * row["min_ms"]
    out = capsys.readouterr().out
    assert "torch fused AdamW ~" in out and "~: noisy, its rounds disagree" in out
    monkeypatch.undo()
    # Every step alike: a sleep long enough that a loaded machine's delays (tens of ms) stay within the bounds.
    row = _fused_adamw_row(monkeypatch, lambda i: 0.25)
    assert not row["noisy"], row
    out = capsys.readouterr().out
    assert "torch fused AdamW " in out and "~" not in out
    quiet = dict(median_ms=1.1, min_ms=1.0, max_ms=1.9)  # within both bounds
    assert not step_time.noisy(quiet)
    assert step_time.noisy(dict(quiet, median_ms=1.3)) and step_time.noisy(dict(quiet, max_ms=2.1))


def test_a_busy_machine_is_said_once(capsys):
    meta = dict(copy_bandwidth_GBps=19.5, copy_bandwidth_after_GBps=10.0)
    line = step_time.busy_line(meta)
    assert "the machine looked busy: copy bandwidth 19.5 GB/s before the rounds, 10.0 after" in line
    assert step_time.busy_line(dict(meta, copy_bandwidth_after_GBps=18.0)) is None


def _result(rows, device):
    quiet = dict(median_ms=1.0, min_ms=0.9, max_ms=1.2, bytes_per_elem=40.0, two_pass_roofline=1.0, host_ms=0.1)
    rows = {name: {**dict.fromkeys(ROW_KEYS), **quiet, **r} for name, r in rows.items()}
    meta = {"device": device, "device_name": device, "copy_bandwidth_GBps": 4000.0}
    return {"set": "s", "tensors": 2, "params": 8, "dtype": "float32", "rows": rows, "skipped": {"x": "why"},
            "floor_bytes": 28, "two_pass_bytes": 40}, meta  # fmt: skip


def test_the_table_shows_the_columns_of_its_device_and_explains_each(capsys):
    gpu = dict(launches=2, peak_extra_mib=0.0, graph_replay_ms=0.9)
    result, meta = _result({"pmdlamb[cuda]": dict(gpu, speedup_vs_apex=1.5), "apex FusedLAMB": gpu}, "cuda")
    step_time.print_table(result, meta)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["contender", "median", "min", "max", "bytes", "per", "%", "of", "40B", "launches",
                                "host", "extra", "graph", "vs"]  # fmt: skip
    assert lines[3].split() == ["ms", "element", "roofline", "ms", "MiB", "ms", "apex"]
    assert lines[4].split() == ["pmdlamb[cuda]", "1.000", "0.900", "1.200", "40.0", "100%", "2", "0.100", "0.0",
                                "0.900", "1.50"]  # fmt: skip
    legend = [line.split(":")[0].strip() for line in lines[6:-1]]
    assert legend == ["median ms, min, max", "bytes per element", "% of 40B roofline", "launches", "host ms",
                      "extra MiB", "graph ms", "vs apex"]  # fmt: skip
    assert "4000 GB/s" in lines[7] and "28 is the one-pass floor" in lines[7]
    assert lines[-1].split() == ["x", "skipped:", "why"]

    # Without apex there is no "vs apex"; off the GPU, neither launches, host time, memory nor graph replays.
    result, meta = _result({"pmdlamb[cuda]": gpu}, "cuda")
    assert [c[0] for c in step_time.columns(result, "cuda")][-1] == ("graph", "ms")
    result, meta = _result({"pmdlamb[cpu]": {}}, "cpu")
    step_time.print_table(result, meta)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["contender", "median", "min", "max", "bytes", "per", "%", "of", "40B"]
    assert lines[4].split() == ["pmdlamb[cpu]", "1.000", "0.900", "1.200", "40.0", "100%"]
    legend = [line.split(":")[0].strip() for line in lines[5:-1]]
    assert legend == ["median ms, min, max", "bytes per element", "% of 40B roofline", "above 100% on CPU"]


def test_a_result_written_before_the_noise_flag_shows_its_noise(capsys, monkeypatch, tmp_path):
    # Rows without a "noisy" entry (results files from before it): the table and the chart judge min, median and max.
    result, meta = _result({"timm Lamb": dict(min_ms=0.5, max_ms=2.0), "pmdlamb[cpu]": {}}, "cpu")
    assert all("noisy" not in row for row in result["rows"].values())
    step_time.print_table(result, meta)
    out = capsys.readouterr().out
    assert "timm Lamb ~" in out and "pmdlamb[cpu] ~" not in out and "~: noisy, its rounds disagree" in out
    import matplotlib.figure

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    step_time.plot([result], dict(meta, date="2026-12-01", torch=torch.__version__), tmp_path / "chart.png")
    (fig,) = drawn
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["timm Lamb ~", "pmdlamb[cpu]"]


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


# --- benchmarks/host_overhead.py: every backend, variant and tensor count has numbers or a reason.

HOST_ROW_KEYS = {"backend", "variant", "device", "launch_mode", "us_per_step", "min_us", "max_us", "samples",
                 "us_per_tensor", "launches", "all_reduces", "ratio", "goal"}  # fmt: skip
HOST_NAMES = {f"{b}/{v}" for b in host_overhead.BACKENDS for v in host_overhead.VARIANTS} | {
    f"{host_overhead.ADAMW[0]}/{v}" for v in host_overhead.ADAMW[1]}  # fmt: skip


def _host_overhead(tmp_path, *args):
    doc = host_overhead.main(["--quick", "--device", "cpu", "--out", str(tmp_path), *args])
    (written,) = tmp_path.glob("host-overhead-*.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(doc))
    meta = doc["meta"]
    assert meta["device"] == "cpu" and meta["torch"] and meta["shapes"] == "one-element" and meta["goals"]
    assert meta["command"].startswith("python -m benchmarks.host_overhead --quick")
    assert [r["tensors"] for r in doc["results"]] == [189]
    for result in doc["results"]:
        assert set(result["rows"]) | set(result["skipped"]) == HOST_NAMES
        assert not set(result["rows"]) & set(result["skipped"])
        assert all(isinstance(reason, str) and reason for reason in result["skipped"].values())
        assert host_overhead.FUSED_ADAMW in result["rows"]
        for name, row in result["rows"].items():
            assert set(row) >= HOST_ROW_KEYS, name
            assert f"{row['backend']}/{row['variant']}" == name and row["samples"] == 9
            for key in ("us_per_step", "min_us", "max_us", "us_per_tensor", "ratio"):
                assert math.isfinite(row[key]) and row[key] > 0, (name, key)
            assert row["min_us"] <= row["us_per_step"] <= row["max_us"]
            assert row["us_per_tensor"] == pytest.approx(row["us_per_step"] / 189)
            assert row["launches"] is None or row["launches"] >= 1
            assert row["all_reduces"] >= 1 if row["variant"] == "sharded" else row["all_reduces"] == 0
            assert row["goal"] is None if row["backend"] == "adamw" else row["goal"] in ("pass", "fail")
    return doc["results"][0]


def test_host_overhead_schema(tmp_path):
    result = _host_overhead(tmp_path, "--no-emulator")
    measured = {name.split("/")[0] for name in result["rows"]}
    assert {"torch", "adamw", *CPU_BACKENDS} <= measured
    assert all("--no-emulator" in result["skipped"][f"cuda/{v}"] for v in host_overhead.VARIANTS)
    assert all(result["rows"][f"triton/{v}"]["launches"] >= 1 for v in ("plain", "lamb") if "triton" in measured)


@pytest.mark.emulator
def test_host_overhead_times_binding_cpp_under_the_emulator(tmp_path, cuda_emulator):
    result = _host_overhead(tmp_path, "--backends", "cuda")
    for variant in host_overhead.VARIANTS:
        if variant != "sharded" or "cuda/sharded" in result["rows"]:
            row = result["rows"][f"cuda/{variant}"]
            assert row["launch_mode"].startswith("emulated") and row["launches"] >= 1


def test_element_bytes_counts_each_stream():
    f32, bf16 = torch.float32, torch.bfloat16
    assert step_time.element_bytes(f32, f32, False, f32) == (28, 40)  # r x,g,m,v; w x,m,v; pass 2 r x,m,v
    assert step_time.element_bytes(bf16, f32, True, f32) == (4 + 4 + 8 + 2 + 4 + 8, 30 + 4 + 8)  # NOTE [master weights]
    assert step_time.element_bytes(bf16, bf16, False, bf16) == (2 + 2 + 4 + 2 + 4, 14 + 2 + 4)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("torch", "cpu")])
def test_mixed_precision_benchmark_smoke(backend, tmp_path):
    doc = mixed_precision.main(["--device", "cpu", "--backend", backend, "--limit", "4", "--rounds", "1",
                                "--steps", "1", "--scenario-steps", "1", "3", "--out", str(tmp_path)])  # fmt: skip
    (written,) = tmp_path.glob("mixed-precision-*.json")
    assert json.loads(written.read_text()) == json.loads(json.dumps(doc))
    rows = doc["rows"]
    assert set(rows) == set(mixed_precision.SETTINGS)
    assert rows["fp32"]["vs_fp32"] == 1.0
    # Bytes per parameter, from the tensors: fp32 x, g and two moments; bf16 x, g, an fp32 master, fp32 moments.
    assert rows["fp32"]["memory_bytes_per_param"] == dict(param=4, grad=4, state=8, total=16)
    assert rows["bf16 + masters"]["memory_bytes_per_param"] == dict(param=2, grad=2, state=12, total=16)
    assert rows["bf16 + stochastic rounding + bf16 moments"]["memory_bytes_per_param"]["total"] == 8
    for name, row in rows.items():
        assert math.isfinite(row["ns_per_elem"]) and row["ns_per_elem"] > 0, name
        assert set(row["scenario_loss"]) == {"start", "after_1", "after_3"}, name
