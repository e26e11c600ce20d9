"""The convergence study: its metric is pycocotools' COCO AP on known boxes, its data is
deterministic and well formed, and its sweep runs end to end (the seconds-long smoke config)."""

import dataclasses
import json
import math

import pytest
import torch

from benchmarks import convergence, convergence_summary, trust_ratios
from benchmarks.detection_task import CLASSES, build_detector, coco_map, evaluate, make_dataset
from largedet_kernels.recipe import scaled_lr


def _targets():
    # Three images, every class, boxes of several sizes.
    return [
        {"boxes": torch.tensor([[10.0, 10, 53, 53], [60, 4, 90, 40]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[0.0, 50, 43, 93]]), "labels": torch.tensor([3])},
        {"boxes": torch.tensor([[20.0, 20, 63, 63], [5, 70, 48, 113]]), "labels": torch.tensor([4, 1])},
    ]


def _predict(targets, shift=0.0, label_offset=0):
    return [{"boxes": t["boxes"] + torch.tensor([shift, 0, shift, 0]),
             "labels": (t["labels"] - 1 + label_offset) % len(CLASSES) + 1,
             "scores": torch.linspace(0.9, 0.5, len(t["labels"]))} for t in targets]  # fmt: skip


def test_perfect_prediction_scores_one():
    targets = _targets()
    assert coco_map(targets, _predict(targets)) == pytest.approx({"mAP": 1.0, "AP50": 1.0}, abs=1e-12)


class _Oracle(torch.nn.Module):
    """A "detector" that looks each image up in the dataset and returns its true boxes,
    ``shift`` images later in the dataset when asked to be wrong."""

    def __init__(self, data, shift=0):
        super().__init__()
        self.data, self.shift = data, shift
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, images):
        assert not self.training
        self.calls.append(len(images))
        found = [next(i for i, (x, _) in enumerate(self.data) if torch.equal(x, image)) for image in images]
        targets = [self.data[(i + self.shift) % len(self.data)][1] for i in found]
        return [dict(t, scores=torch.ones(len(t["labels"]))) for t in targets]


def test_evaluate_scores_true_boxes_one_over_several_batches():
    data = make_dataset(21, 48, seed=5)
    oracle = _Oracle(data)
    assert evaluate(oracle, data, batch=8) == pytest.approx({"mAP": 1.0, "AP50": 1.0}, abs=1e-12)
    assert oracle.calls == [8, 8, 5] and oracle.training
    # Every prediction one image off: if evaluate paired predictions with the wrong images, it would look like this.
    assert evaluate(_Oracle(data, shift=1), data, batch=8)["AP50"] < 0.2


def test_iou_072_matches_half_of_the_thresholds():
    # A 43-wide box shifted by 7 px overlaps 36 of a 50-wide union: IoU 0.72 matches at
    # thresholds .50, .55, .60, .65, .70 and misses .75 ... .95, so AP@[.5:.95] = 5/10.
    targets = [t for t in _targets() if (t["boxes"][:, 2] - t["boxes"][:, 0] == 43).all()]
    assert len(targets) == 2
    result = coco_map(targets, _predict(targets, shift=7.0))
    assert result["AP50"] == pytest.approx(1.0)
    assert result["mAP"] == pytest.approx(0.5)


def test_wrong_class_scores_zero():
    targets = _targets()
    assert coco_map(targets, _predict(targets, label_offset=1)) == {"mAP": 0.0, "AP50": 0.0}
    assert coco_map(targets, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                               "scores": torch.zeros(0)} for _ in targets]) == {"mAP": 0.0, "AP50": 0.0}  # fmt: skip


def test_half_recall_is_the_101_point_interpolation():
    # Class 1 has two ground-truth boxes, one found: precision 1 up to recall 0.5, none
    # after, so 51 of COCO's 101 recall points have precision 1; classes 2..4 are perfect.
    targets = _targets()
    predictions = _predict(targets)
    keep = torch.tensor([True, False])  # drop image 2's class-1 detection
    predictions[2] = {k: v[keep] for k, v in predictions[2].items()}
    assert predictions[2]["labels"].tolist() == [4]
    expected = (51 / 101 + 3) / 4
    result = coco_map(targets, predictions)
    assert result["mAP"] == pytest.approx(expected) and result["AP50"] == pytest.approx(expected)


def test_coco_map_checks_lengths():
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        coco_map(_targets(), _predict(_targets())[:2])


def test_dataset_is_deterministic_and_well_formed():
    size = 64
    data = make_dataset(48, size, seed=3)
    again = make_dataset(48, size, seed=3)
    other = make_dataset(48, size, seed=4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in zip(data, again))
    assert not torch.equal(data[0][0], other[0][0])
    seen = set()
    for image, target in data:
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
        boxes, labels = target["boxes"], target["labels"]
        assert 1 <= len(labels) == len(boxes) <= 4
        assert ((labels >= 1) & (labels <= len(CLASSES))).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        sides = boxes[:, 2:] - boxes[:, :2]
        assert (sides >= 3).all() and (sides <= size // 2 + 1).all()
        for i in range(len(boxes)):  # objects never overlap, so every box is fully visible
            for j in range(i):
                a, b = boxes[i], boxes[j]
                assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
        seen.update(labels.tolist())
    assert seen == set(range(1, len(CLASSES) + 1))


def test_plans_cover_the_issue():
    for name in ("cpu", "gpu"):
        config = convergence.CONFIGS[name]
        runs = convergence.plan(config)
        assert max(config.batch_sizes) >= 16 * min(config.batch_sizes)
        for batch in config.batch_sizes:  # every optimizer at every batch size
            assert {r["optimizer"] for r in runs if r["batch"] == batch} == set(convergence.OPTIMIZERS)
        ablation = [r for r in runs if r["batch"] == config.ablation_batch and r["optimizer"] != "sgd"]
        assert {r["cycle_length"] for r in ablation if r["alpha"] == config.alpha} >= set(
            config.ablation_cycle_lengths
        ) | {None}
        assert {r["alpha"] for r in ablation if r["cycle_length"] == config.cycle_length} >= set(config.ablation_alphas)
        assert len(runs) == len({json.dumps(r, sort_keys=True) for r in runs})
        assert all((r["optimizer"] == "lamb") == (r["cycle_length"] is None and r["optimizer"] != "sgd") for r in runs)


def test_config_refuses_a_cycle_that_is_lamb():
    # ξ = cos(π/2 · (t mod T)/T) is 1 at every step when T = 1: such a run would be LAMB.
    for field in ("cycle_length", "ablation_cycle_lengths"):
        value = 1 if field == "cycle_length" else (5, 1)
        with pytest.raises(ValueError, match="T = 1"):
            dataclasses.replace(convergence.CONFIGS["smoke"], **{field: value})


def test_smoke_sweep_end_to_end(tmp_path):
    doc = convergence.main(["--config", "smoke", "--device", "cpu", "--out", str(tmp_path)])
    (written,) = tmp_path.glob("*.json")
    assert written.name.startswith("convergence-smoke-seed0-")
    assert json.loads(written.read_text()) == json.loads(json.dumps(doc))
    assert list(tmp_path.glob("*.png")) == [written.with_suffix(".png")]
    config = convergence.CONFIGS["smoke"]
    assert doc["meta"]["pycocotools"] and doc["meta"]["device"] == "cpu" and doc["meta"]["seconds"] > 0
    assert [
        {k: r[k] for k in ("optimizer", "batch", "alpha", "cycle_length")} for r in doc["runs"]
    ] == convergence.plan(config)
    for run in doc["runs"]:
        assert run["batch"] == run["micro_batch"] * run["accumulation"]
        assert run["micro_batch"] == min(run["batch"], config.micro_batch)
        assert run["steps"] == config.epochs * (config.train_images // run["batch"]) == len(run["loss"])
        base = config.sgd_lr if run["optimizer"] == "sgd" else config.lamb_lr
        assert run["lr"] == pytest.approx(scaled_lr(base, config.batch_sizes[0], run["batch"]))
        assert not run["diverged"] and all(math.isfinite(v) and v > 0 for v in run["loss"])
        last_epoch = run["loss"][-(config.train_images // run["batch"]) :]
        assert run["last_epoch_loss"] == pytest.approx(sum(last_epoch) / len(last_epoch))
        assert 0 <= run["mAP"] <= run["AP50"] <= 1


def test_overrides_change_the_runs_and_name_the_files(tmp_path):
    # Batch 8 is not in the smoke sweep (2, 4): the ablation brings its references, T = 2 and T = ∞.
    doc = convergence.main(["--config", "smoke", "--device", "cpu", "--out", str(tmp_path),
                            "--lamb-lr", "0.03", "--ablation-batch", "8"])  # fmt: skip
    (written,) = tmp_path.glob("*.json")
    assert written.name.startswith("convergence-smoke-lamb_lr0.03-ablation_batch8-seed0-")
    assert (doc["config"]["lamb_lr"], doc["config"]["ablation_batch"]) == (0.03, 8)
    at_8 = [(r["optimizer"], r["cycle_length"], r["alpha"]) for r in doc["runs"] if r["batch"] == 8]
    assert at_8 == [("pmd-lamb", 2, 0.012), ("lamb", None, 0.012), ("pmd-lamb", 3, 0.012), ("pmd-lamb", 2, 0.02)]
    assert "--lamb-lr 0.03" in doc["meta"]["command"]
    smoke = convergence.CONFIGS["smoke"]
    for run in doc["runs"]:
        base = smoke.sgd_lr if run["optimizer"] == "sgd" else 0.03
        assert run["lr"] == pytest.approx(scaled_lr(base, smoke.batch_sizes[0], run["batch"]))
    assert {r["batch"] for r in doc["runs"]} == {2, 4, 8}
    text = convergence_summary.tables([doc])  # the sweep's table has no batch-8 column; the ablation has T = ∞
    assert "batch 8 (1 steps)" not in text and "| T = ∞ |" in text.split("Ablation at batch 8, η 0.03")[1]


@pytest.mark.parametrize(
    "flag, value, message",
    [("--lamb-lr", "0", "must be positive"), ("--lamb-lr", "-0.1", "must be positive"),
     ("--ablation-batch", "0", "must be positive"), ("--ablation-batch", "3", "multiple of the micro-batch 2"),
     ("--ablation-batch", "10", "at most the 8 training images")],
)  # fmt: skip
def test_overrides_are_checked(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        convergence.main(["--config", "smoke", "--no-files", flag, value])
    assert message in capsys.readouterr().err


def test_gradient_accumulation_is_the_large_batch(monkeypatch):
    # One step of batch 4 as 2 micro-batches of 2 equals one step of batch 4 in one piece,
    # once the RPN and box head sample their anchors and proposals without randomness (the
    # random draws' order differs between the two). Faster R-CNN samples a fixed count per
    # image and averages over all of them, so the mean over micro-batches is the batch mean.
    real_randperm = torch.randperm

    def randperm(n, *, generator=None, **kw):
        return (
            real_randperm(n, generator=generator, **kw)
            if generator is not None
            else torch.arange(n, device=kw.get("device"))
        )

    monkeypatch.setattr(torch, "randperm", randperm)
    config = dataclasses.replace(convergence.CONFIGS["smoke"], epochs=1, train_images=4, batch_sizes=(4,))
    data = make_dataset(4, config.image_size, seed=0)
    run = dict(optimizer="sgd", batch=4, alpha=None, cycle_length=None)
    models = []
    real_build = convergence.build_detector
    monkeypatch.setattr(convergence, "build_detector", lambda *a: models.append(real_build(*a)) or models[-1])
    monkeypatch.setattr(convergence, "evaluate", lambda model, data: {"mAP": 0.0, "AP50": 0.0})
    split = convergence.train(config, run, data, data, torch.device("cpu"))
    whole = convergence.train(dataclasses.replace(config, micro_batch=4), run, data, data, torch.device("cpu"))
    assert (split["accumulation"], whole["accumulation"]) == (2, 1)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(models[0].parameters(), real_build(config.image_size, config.seed).parameters())
    )


def test_divergence_is_reported():
    config = dataclasses.replace(convergence.CONFIGS["smoke"], epochs=3, sgd_lr=1e8, warmup_epochs=0)
    data = make_dataset(config.train_images, config.image_size, seed=0)
    result = convergence.train(config, dict(optimizer="sgd", batch=2, alpha=None, cycle_length=None), data, data[:2],
                               torch.device("cpu"))  # fmt: skip
    assert result["diverged"] and (result["mAP"], result["AP50"]) == (0.0, 0.0)
    assert result["last_epoch_loss"] is None and len(result["loss"]) < result["steps"]
    assert all(math.isfinite(v) for v in result["loss"])
    json.dumps(result, allow_nan=False)


def test_parallel_jobs_train_the_same_runs():
    # Seed 1 in both, so the workers must receive the seed, not only the config's name.
    sequential = convergence.main(["--config", "smoke", "--device", "cpu", "--no-files", "--seed", "1"])
    parallel = convergence.main(["--config", "smoke", "--device", "cpu", "--no-files", "--seed", "1", "--jobs", "2"])
    assert parallel["meta"]["jobs"] == 2 and parallel["config"]["seed"] == sequential["config"]["seed"] == 1
    assert len(parallel["runs"]) == len(sequential["runs"])
    for a, b in zip(parallel["runs"], sequential["runs"]):
        measured = ("loss", "last_epoch_loss", "seconds", "mAP", "AP50")
        assert {k: v for k, v in a.items() if k not in measured} == {k: v for k, v in b.items() if k not in measured}
        # The first loss depends only on the fresh weights and the first batch; later ones
        # may differ in rounding, as the workers use fewer threads each.
        assert a["loss"][0] == pytest.approx(b["loss"][0], rel=1e-4)
    with pytest.raises(SystemExit):
        convergence.main(["--config", "smoke", "--jobs", "0"])


def test_seed_makes_a_replicate():
    # Another seed draws other data, weights and image order: every run's first loss differs.
    seed0 = convergence.main(["--config", "smoke", "--device", "cpu", "--no-files"])
    seed1 = convergence.main(["--config", "smoke", "--device", "cpu", "--no-files", "--seed", "1"])
    assert (seed0["config"]["seed"], seed1["config"]["seed"]) == (0, 1)
    for a, b in zip(seed0["runs"], seed1["runs"]):
        assert a["loss"][0] != pytest.approx(b["loss"][0], rel=1e-3)


def _doc(seed, maps, lamb_lr=0.1, device="a machine"):
    """A study's JSON as benchmarks.convergence writes it, with the given mAP per run (None: diverged)."""
    smoke = convergence.CONFIGS["smoke"]
    config = dataclasses.asdict(dataclasses.replace(smoke, seed=seed, lamb_lr=lamb_lr))
    runs = [
        dict(run, mAP=m or 0.0, diverged=m is None, steps=smoke.epochs * smoke.train_images // run["batch"],
             loss=[2.0, 1.5, 1.0])
        for run, m in zip(convergence.plan(smoke), maps)
    ]  # fmt: skip
    return {"meta": {"device_name": device}, "config": config, "runs": runs}


def test_summary_tables_every_seed_and_the_mean():
    plan = convergence.plan(convergence.CONFIGS["smoke"])
    # smoke: batches (2, 4) x (sgd, lamb, pmd-lamb), then PMD-LAMB at batch 4 with T = 3 and with α = 0.02.
    assert [(r["optimizer"], r["batch"], r["cycle_length"], r["alpha"]) for r in plan] == [
        ("sgd", 2, None, None), ("lamb", 2, None, 0.012), ("pmd-lamb", 2, 2, 0.012),
        ("sgd", 4, None, None), ("lamb", 4, None, 0.012), ("pmd-lamb", 4, 2, 0.012),
        ("pmd-lamb", 4, 3, 0.012), ("pmd-lamb", 4, 2, 0.02)]  # fmt: skip
    seed0 = _doc(0, [0.30, 0.10, 0.20, None, 0.15, 0.25, 0.05, 0.35])
    seed1 = _doc(1, [0.40, 0.20, 0.10, 0.02, 0.25, 0.15, 0.15, 0.45])
    text = convergence_summary.tables([seed1, seed0])
    assert "seeds 0 / 1 (**mean**)" in text and "| | batch 2 (4 steps) | batch 4 (2 steps) |" in text
    assert "| SGD + LSR + warm-up, η 0.01 | 30.0 / 40.0 (**35.0**) | div. / 2.0 (**1.0**) |" in text
    assert "| LAMB (T = ∞), η 0.1 | 10.0 / 20.0 (**15.0**) | 15.0 / 25.0 (**20.0**) |" in text
    assert "| PMD-LAMB (T = 2), η 0.1 | 20.0 / 10.0 (**15.0**) | 25.0 / 15.0 (**20.0**) |" in text
    assert "Ablation at batch 4, η 0.1" in text
    ablation = text.split("Ablation at batch 4")[1]
    assert ablation.index("| T = 2 |") < ablation.index("| T = 3 |") < ablation.index("| T = ∞ |")
    assert "| T = 3 | 5.0 / 15.0 (**10.0**) |" in ablation and "| α = 0.02 | 35.0 / 45.0 (**40.0**) |" in ablation
    # Its references come from the sweep at batch 4: T = 2 (= α 0.012) is PMD-LAMB's, T = ∞ is LAMB's.
    assert "| T = 2 | 25.0 / 15.0 (**20.0**) |" in ablation and "| α = 0.012 | 25.0 / 15.0 (**20.0**) |" in ablation
    assert "| T = ∞ | 15.0 / 25.0 (**20.0**) |" in ablation
    # A finite loss that rose above 10× its first value marks the mAP.
    seed1["runs"][1]["loss"] = [2.0, 20.1, 1.0]
    seed0["runs"][1]["loss"] = [2.0, 19.9, 1.0]
    assert "| LAMB (T = ∞), η 0.1 | 10.0 / 20.0↑ (**15.0**) |" in convergence_summary.tables([seed0, seed1])
    # A study with another η adds rows; its SGD runs are the same runs and must agree.
    other = _doc(0, [0.30, 0.50, 0.60, None, 0.55, 0.65, 0.05, 0.35], lamb_lr=0.4)
    text = convergence_summary.tables([seed0, seed1, other])
    assert "| LAMB (T = ∞), η 0.4 | 50.0 / — | 55.0 / — |" in text and text.count("| SGD") == 1
    other["runs"][0]["loss"] = [2.0, 1.5, 1.01]  # same mAP, another loss: not the same training
    with pytest.raises(ValueError, match="trained twice with different results: mAP 0.3 and 0.3, losses not"):
        convergence_summary.tables([seed0, other])
    other["runs"][0]["loss"] = seed0["runs"][0]["loss"]
    other["runs"][0]["mAP"] = 0.31
    with pytest.raises(ValueError, match="trained twice with different results"):
        convergence_summary.tables([seed0, other])
    with pytest.raises(ValueError, match="2 machines"):
        convergence_summary.tables([seed0, _doc(1, [0.4] * 8, device="another machine")])
    other["config"]["epochs"] = 2
    with pytest.raises(ValueError, match="different configs"):
        convergence_summary.tables([seed0, other])


def test_summary_of_real_runs(tmp_path, capsys):
    docs = [convergence.main(["--config", "smoke", "--device", "cpu", "--out", str(tmp_path), "--seed", str(s)])
            for s in (0, 1)]  # fmt: skip
    capsys.readouterr()
    files = sorted(tmp_path.glob("*.json"))
    text = convergence_summary.main([*map(str, files), "--png", str(tmp_path / "summary.png")])
    assert capsys.readouterr().out.strip() == text
    assert (tmp_path / "summary.png").stat().st_size > 0
    lamb = [next(r for r in d["runs"] if r["optimizer"] == "lamb" and r["batch"] == 4)["mAP"] for d in docs]
    row = next(line for line in text.splitlines() if line.startswith("| LAMB (T = ∞), η 0.01 | "))
    cell = row.split(" | ")[-1]  # batch 4: "seed 0 / seed 1 (**mean**) |"
    assert cell.startswith(f"{100 * lamb[0]:.1f}") and f" / {100 * lamb[1]:.1f}" in cell
    assert float(cell.split("**")[1]) == pytest.approx(50 * (lamb[0] + lamb[1]), abs=0.051)


def test_trust_ratio_figure_end_to_end(tmp_path, capsys):
    # The smoke run's 2 steps at its ablation batch 4; the records of the last, beside ‖g‖ from the gradients.
    docs = [trust_ratios.main(["--config", "smoke", "--device", "cpu", "--out", str(tmp_path), "--at", "2"])
            for _ in range(2)]  # fmt: skip
    assert "x_over_g: " in capsys.readouterr().out
    first, second = sorted(tmp_path.glob("*.json"), key=lambda f: len(f.name))  # the second run took a name of its own
    assert first.name.startswith("trust-ratios-smoke-seed0-") and second.stem == first.stem + "-2"
    assert {first.with_suffix(".png"), second.with_suffix(".png")} == set(tmp_path.glob("*.png"))
    assert [json.loads(f.read_text()) for f in (first, second)] == json.loads(json.dumps(docs))
    doc = docs[0]
    assert doc["step"] == 2 and doc["run"]["steps"] == 2 and doc["meta"]["torchvision"]
    assert doc["meta"]["command"].startswith("python -m benchmarks.trust_ratios --config smoke")
    weights = [n for n, p in build_detector(48, 0).named_parameters() if p.dim() > 1]
    assert [layer["name"] for layer in doc["layers"]] == weights
    for layer in doc["layers"]:
        assert layer["step"] == 2 and layer["module"] == trust_ratios.module_of(layer["name"])
        assert layer["x_over_g"] == pytest.approx(layer["x_norm"] / layer["g_norm"], rel=1e-12)
        # PMD-LAMB's ratio is unbounded: the kernel's applied ratio is ‖x‖/‖u‖ of the norms it recorded.
        assert layer["ratio"] == pytest.approx(layer["x_over_u"], rel=1e-5)
    for key in ("x_over_g", "x_over_u"):
        values = [layer[key] for layer in doc["layers"]]
        s = doc["summary"][key]
        assert (s["min"], s["max"]) == (min(values), max(values)) and s["min"] > 0
        assert s["max_over_min"] == pytest.approx(s["max"] / s["min"])
    assert docs[1]["layers"] == doc["layers"]  # one seed, one run


def test_trust_ratio_figure_refuses_a_step_outside_the_run(capsys):
    with pytest.raises(SystemExit):
        trust_ratios.main(["--config", "smoke", "--at", "3"])
    assert "--at must be a step of the run's 2, got 3" in capsys.readouterr().err
