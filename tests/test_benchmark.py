"""The main job runs end to end and reports a number for every contender it does not skip."""

import math

from benchmarks import step_time


def test_step_time_smoke(tmp_path):
    out = tmp_path / "result.json"
    result = step_time.main(["--device", "cpu", "--limit", "12", "--warmup", "1", "--steps", "1", "--rounds", "2",
                             "--json", str(out)])  # fmt: skip
    assert out.exists()
    assert result["tensors"] == 12 and result["device"] == "cpu"
    assert set(result["rows"]) | set(result["skipped"]) == {"pmdlamb[cuda]", "pmdlamb[triton]", "pmdlamb[torch]",
                                                            "reference loop"}  # fmt: skip
    for row in result["rows"].values():
        assert row["samples"] == 2 and math.isfinite(row["median_ms"]) and row["median_ms"] > 0
    assert all(reason for reason in result["skipped"].values())


def test_parameter_sets_match_the_models():
    # Counts of torchvision's fasterrcnn/maskrcnn_resnet50_fpn with BatchNorm parameters.
    frcnn = step_time.load_shapes("faster_rcnn_r50_fpn")
    mrcnn = step_time.load_shapes("mask_rcnn_r50_fpn")
    assert (len(frcnn), sum(math.prod(s) for s in frcnn)) == (189, 41_808_406)
    assert (len(mrcnn), sum(math.prod(s) for s in mrcnn)) == (201, 44_454_513)
