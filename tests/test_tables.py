"""Every table of results in README.md and docs/ is what benchmarks.tables renders from the committed JSON."""

import json
import re
import shutil

import pytest

from benchmarks import tables

# A markdown table row holding a decimal number: a result, which only a generated block may hold.
RESULT_ROW = re.compile(r"^\|.*\d\.\d.*\|$")


def _docs():
    return [tables.ROOT / "README.md", *sorted((tables.ROOT / "docs").glob("*.md"))]


def test_every_table_matches_its_json():
    assert tables.stale() == []
    assert tables.main(["--check"]) == 0


@pytest.mark.parametrize("name", sorted(tables.TABLES))
def test_each_table_is_in_its_file_once_and_names_its_sources(name):
    table = tables.TABLES[name]
    text = (tables.ROOT / table.doc).read_text()
    assert text.count(f"<!-- table:{name} -->") == text.count(f"<!-- /table:{name} -->") == 1
    assert table.sources and all((tables.ROOT / s).is_file() for s in table.sources)
    assert " ".join(tables.render(name).split()).endswith("by `python -m benchmarks.tables --write`.")


def test_no_result_table_outside_the_generated_blocks():
    for path in _docs():
        text = re.sub(r"<!-- table:([\w-]+) -->.*?<!-- /table:\1 -->", "", path.read_text(), flags=re.S)
        assert text.count("<!-- table:") == 0, path
        rows = [line for line in text.splitlines() if RESULT_ROW.match(line)]
        assert rows == [], (path, rows)


def _copy(tmp_path):
    for path in _docs():
        dest = tmp_path / path.relative_to(tables.ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    shutil.copytree(tables.ROOT / tables.RESULTS, tmp_path / tables.RESULTS)
    return tmp_path


def test_a_number_edited_in_the_readme_fails_the_check_and_write_restores_it(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    original = readme.read_text()
    cpu_row = re.search(r"^\| pmdlamb\[cpu\] \| (\d+\.\d) \|", original, re.M)
    readme.write_text(original.replace(cpu_row.group(0), cpu_row.group(0).replace(cpu_row.group(1), "1.0"), 1))
    assert tables.stale(root) == ["step-time-cpu"]
    assert tables.write(root) == ["step-time-cpu"]
    assert readme.read_text() == original and tables.stale(root) == []


def test_a_changed_results_file_fails_the_check(tmp_path):
    root = _copy(tmp_path)
    source = root / tables.TABLES["lr-sweep"].sources[0]
    doc = json.loads(source.read_text())
    doc["runs"][0]["loss"][-1] = 2.5
    source.write_text(json.dumps(doc))
    assert tables.stale(root) == ["lr-sweep"]
    assert "| 0.001 | 1.2e-05 | 2.35 | 2.21 | 2.5 |" in tables.render("lr-sweep", root)


def test_missing_or_doubled_markers_fail(tmp_path):
    root = _copy(tmp_path)
    doc = root / "docs" / "convergence.md"
    text = doc.read_text()
    doc.write_text(text.replace("<!-- table:convergence-xeon -->", ""))
    assert tables.stale(root, ["convergence-xeon"]) == ["convergence-xeon"]
    with pytest.raises(ValueError, match="convergence-xeon once, not 0 times"):
        tables.write(root)


def test_the_lr_sweep_shows_that_lr_1e_3_barely_trains():
    (doc,) = [json.loads((tables.ROOT / s).read_text()) for s in tables.TABLES["lr-sweep"].sources]
    final = {run["lr"]: run["loss"][-1] for run in doc["runs"]}
    assert doc["config"] == dict(steps=30, batch=16, image_size=64, backend="cpu", seed=0)
    assert all(len(run["loss"]) == 31 and run["loss"][0] == doc["runs"][0]["loss"][0] for run in doc["runs"])
    assert sorted(final) == [1e-3, 1e-2, 0.1, 0.5]
    assert final[1e-3] > 1.9 and final[0.1] < 0.01 and final[1e-3] > final[1e-2] > final[0.1] > final[0.5]


def test_the_step_time_table_marks_a_noisy_median():
    meta = dict(command="python -m benchmarks.step_time", date="2026-12-01", device_name="cpu", threads=2,
                torch="2.14.1", copy_bandwidth_GBps=20.0)  # fmt: skip
    quiet, spread = dict(median_ms=10.0, min_ms=9.0, max_ms=12.0), dict(median_ms=10.0, min_ms=4.0, max_ms=12.0)
    rows = {"a": dict(quiet, bytes_per_elem=30.0), "b": dict(spread, bytes_per_elem=30.0)}
    result = dict(set="s", dtype="float32", tensors=2, params=8, rows=rows)
    text = tables.step_time_table([dict(meta=meta, results=[result])])
    assert "| a | 10.0 | 30.0 |" in text and "| b | 10.0 ~ | 30.0 |" in text
    assert "~: noisy, its rounds disagree" in text
    rows["b"] = dict(quiet, bytes_per_elem=30.0)
    assert "~" not in tables.step_time_table([dict(meta=meta, results=[result])])
