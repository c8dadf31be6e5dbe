"""Tests of tlhelpers.course_map and the course map the learner reads: the
rule that estimates learner time, extensions counted apart, each notebook
stating its time, the README and notebook 00 showing the map, a
prediction asked for in every core notebook, and the 90-minute core
path."""

import json
import math
import re
from pathlib import Path

import pytest

from tlhelpers import course_map, exercises

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
README = (ROOT / "README.md").read_text(encoding="utf-8")
# A stated time may lag the estimate by this many minutes: prose edits
# move it a little; a larger change must update the statement.
SLACK_MINUTES = 3


def _nb(cells):
    return {"cells": cells, "metadata": {}, "nbformat": 4,
            "nbformat_minor": 5}


def _md(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def _code(text, tags=()):
    return {"cell_type": "code", "metadata": {"tags": list(tags)},
            "outputs": [], "execution_count": None, "source": text}


def _write(tmp_path, name, cells):
    path = tmp_path / f"{name}.ipynb"
    path.write_text(json.dumps(_nb(cells)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def estimates():
    return {e.notebook: e for e in course_map.course_map(NOTEBOOKS)}


# ---------------------------------------------------------------- the rule


def test_code_lines_count_what_a_learner_reads():
    source = ("import torch\nfrom a import (b,\n    c)\n\n# a comment\n"
              "x = torch.ones(3)  # set x\nprint(x)\n")
    assert course_map.code_lines(source) == 2
    assert course_map.code_lines("# extra code - a plot\nplot(x)\n") == 0
    assert course_map.words("One two, three.\n\n- four") == 5


def test_the_rule_adds_words_code_compute_and_exercise_minutes(tmp_path):
    path = _write(tmp_path, "09_rule", [
        _md(" ".join(["word"] * 300)),
        _code("\n".join(f"x{i} = {i}" for i in range(20))),
        _code("answer = ...", ["exercise:pick_layer"]),
        _md("## Further reading\n\n" + " ".join(["link"] * 500))])
    est = course_map.estimate(path, {"09_rule": 120})
    minutes = (300 / course_map.WORDS_PER_MINUTE
               + 21 / course_map.CODE_LINES_PER_MINUTE
               + exercises.pick_layer.minutes + 2)
    assert est.core_minutes == pytest.approx(minutes)
    assert est.extension_minutes == 0


def test_extension_sections_cells_and_notebooks_are_counted_apart(
        tmp_path):
    cells = [
        _md("# 09 · Title"),
        _md("## 1. Core\n\n" + " ".join(["w"] * 150)),
        _md("## 2. Extension: more\n\n" + " ".join(["w"] * 300)),
        _code("a = 1\nb = 2"),
        _md("### Still in the extension"),
        _md("## 3. Core again"),
        _code("c = 3"),
        _md("### Extension: a detour"),
        _code("d = 4"),
        _md("### Back on the core path"),
        _code("e = 5", ["extension"]),
        _md("## Further reading\n\nlinks"),
    ]
    nb = _nb(cells)
    assert course_map.cell_paths(nb) == [
        "core", "core", "extension", "extension", "extension", "core",
        "core", "extension", "extension", "core", "extension", "reading"]
    est = course_map.estimate(_write(tmp_path, "09_x", cells), {"09_x": 0})
    assert (est.code_lines, est.ext_code_lines) == (1, 4)
    # heading words count: "## 2. Extension: more" is 4 of them
    assert est.ext_words == (4 + 300) + 5 + 4 and not est.extension
    cells[0] = _md("# 09 · Title\n\n*Course map: extension.*")
    whole = course_map.estimate(_write(tmp_path, "09_x", cells),
                                {"09_x": 60})
    assert whole.extension and whole.core_minutes == 0
    marker = 3 / course_map.WORDS_PER_MINUTE   # "*Course map: extension.*"
    assert whole.extension_minutes == pytest.approx(
        est.total_minutes + 1 + marker)


def test_extension_cells_compute_counts_toward_the_extensions(tmp_path):
    path = _write(tmp_path, "09_split", [
        _md("## 1. Core"), _code("a = 1"),
        _md("## 2. Extension: slow"), _code("b = 2")])
    est = course_map.estimate(path, {"09_split": (60, 240)})
    assert est.compute == pytest.approx(1)
    assert est.ext_compute == pytest.approx(4)
    assert est.core_minutes == pytest.approx(
        est.words / course_map.WORDS_PER_MINUTE + 0.1 + 1)
    assert est.extension_minutes == pytest.approx(
        est.ext_words / course_map.WORDS_PER_MINUTE + 0.1 + 4)


def _timed(cell, start, seconds):
    cell["metadata"]["execution"] = {
        "iopub.execute_input": f"2026-01-01T10:00:{start:02d}.000000Z",
        "shell.execute_reply": f"2026-01-01T10:00:{start + seconds:02d}"
                               ".500000Z"}
    return cell


def test_measured_compute_splits_a_build_by_the_cells_timings(tmp_path):
    cells = [_md("## 1. Core"), _timed(_code("a = 1"), 0, 3),
             _md("## 2. Extension: slow"), _timed(_code("b = 2"), 4, 20),
             _timed(_code("c = 3", ["extension"]), 30, 5)]
    _write(tmp_path, "09_split", cells)
    _write(tmp_path, "10_extra", [
        _md("# 10 · More\n\n*Course map: extension.*"),
        _timed(_code("d = 4"), 0, 9)])
    _write(tmp_path, "11_broken", [_code("e = 5")])
    (tmp_path / "build.json").write_text(json.dumps({"notebooks": [
        {"name": "09_split.ipynb", "ipynb": "09_split.ipynb",
         "status": "passed", "seconds": 40.0},
        {"name": "10_extra.ipynb", "ipynb": "10_extra.ipynb",
         "status": "passed", "seconds": 12.0},
        {"name": "11_broken.ipynb", "status": "failed", "seconds": 1.0}]}))
    # 20.5 + 5.5 s in extension cells; the rest, the start included, core
    assert course_map.measured_compute(tmp_path) == {
        "09_split": (14, 26), "10_extra": (0, 12)}
    assert course_map.cell_seconds(_code("x = 1")) == 0.0


def test_a_core_cell_that_needs_an_extension_is_found():
    nb = _nb([
        _md("## 1. Core"), _code("import torch\nmodel = 1\nrate = 2"),
        _md("## 2. Extension: a detour"),
        _code("detour = model * 2\ndef helper(x):\n    return x\n"
              "rate = 3"),
        _md("## 3. Core again"),
        _code("%matplotlib inline\nprint(model, rate, torch)\n"
              "total = helper(detour) + sum(i for i in range(3))"),
    ])
    assert course_map.extension_dependencies(nb) == [
        (5, "detour"), (5, "helper")]
    nb["cells"][3]["source"] = "detour2 = 1"
    assert course_map.extension_dependencies(nb) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_core_path_stands_without_the_extensions(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = course_map.extension_dependencies(nb)
    assert not found, (
        f"core cells use names only extension cells define (cell, name): "
        f"{found}; define them on the core path, or mark the cell as an "
        "extension")


def test_a_notebook_without_a_measured_compute_time_is_explained(
        tmp_path):
    path = _write(tmp_path, "09_new", [_md("# 09 · New")])
    with pytest.raises(ValueError, match="tlcourse run"):
        course_map.estimate(path, {})


def test_every_exercise_states_its_minutes():
    for exercise in exercises.EXERCISES.values():
        assert 1 <= exercise.minutes <= 60, exercise.name


# ----------------------------------------------------- the course's map


def test_every_notebook_has_a_measured_compute_time():
    assert set(course_map.COMPUTE_SECONDS) == {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_states_its_learner_time_as_estimated(path,
                                                             estimates):
    est = estimates[path.stem]
    stated = course_map.stated_minutes(path)
    assert stated is not None, (
        f"state the learner time near the top: {course_map.stated_line(est)}")
    want = math.ceil(est.total_minutes if est.extension
                     else est.core_minutes)
    assert abs(stated - want) <= SLACK_MINUTES, (
        f"{path.stem} states {stated} minutes, the rule gives {want}: "
        f"{course_map.stated_line(est)}")


def _map_rows(text):
    """Read `| NN name | core/extension | N min | N min | ... |` rows."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.match(r"^\d\d ", cells[0]) and (
                cells[1] in ("core", "extension")):
            core = re.match(r"(\d+) min", cells[2])
            ext = re.match(r"(\d+) min", cells[3])
            rows[cells[0][:2]] = (cells[1], int(core.group(1)) if core
                                  else 0, int(ext.group(1)) if ext else 0)
    return rows


def _check_map(text, estimates, where):
    rows = _map_rows(text)
    assert sorted(rows) == sorted(n[:2] for n in estimates), where
    for stem, est in estimates.items():
        path, core, ext = rows[stem[:2]]
        assert path == ("extension" if est.extension else "core"), stem
        assert abs(core - round(est.core_minutes)) <= SLACK_MINUTES, (
            where, stem, core, est.core_minutes)
        assert abs(ext - round(est.extension_minutes)) <= SLACK_MINUTES, (
            where, stem, ext, est.extension_minutes)
    total = re.search(r"\| *core path, in all *\| *core *\| *(\d+) min",
                      text)
    assert total, f"{where}: a row with the core path's total"
    assert abs(int(total.group(1)) - round(course_map.core_path_minutes(
        estimates.values()))) <= SLACK_MINUTES, where


def test_readme_shows_the_course_map_with_learner_and_compute_times(
        estimates):
    section = README.split("## The course map", 1)[1].split("\n## ", 1)[0]
    _check_map(section, estimates, "README")
    assert re.search(r"150 words a\s+minute", section)


def test_the_welcome_notebook_shows_the_course_map(estimates):
    nb = json.loads((ROOT / "notebooks" / "00_welcome.ipynb").read_text(
        encoding="utf-8"))
    text = "\n".join("".join(c["source"]) for c in nb["cells"]
                     if c["cell_type"] == "markdown")
    _check_map(text, estimates, "00_welcome")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_core_notebook_asks_for_a_prediction_before_measuring(
        path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    if course_map.is_extension_notebook(nb):
        pytest.skip("an extension")
    paths = course_map.cell_paths(nb)
    cells = nb["cells"]
    asks = [i for i, (c, where) in enumerate(zip(cells, paths))
            if where == "core" and c["cell_type"] == "markdown"
            and "**Predict" in "".join(c["source"])]
    assert asks, "ask for a prediction (**Predict ...**) on the core path"
    assert any(c["cell_type"] == "code" for c in cells[asks[0] + 1:]), (
        "a cell must measure what the learner predicted")


def test_plumbing_lives_in_the_appendix_not_in_the_welcome():
    welcome = (ROOT / "notebooks" / "00_welcome.ipynb").read_text(
        encoding="utf-8")
    for plumbing in ("doctor(", "TLH_SMOKE", "TLH_OFFLINE", "cache_dir"):
        assert plumbing not in welcome, plumbing
    appendix = [p for p in NOTEBOOKS if "appendix" in p.stem]
    assert len(appendix) == 1
    text = appendix[0].read_text(encoding="utf-8")
    for plumbing in ("doctor(", "TLH_SMOKE", "TLH_STRICT", "tlcourse grade"):
        assert plumbing in text, plumbing
    assert course_map.is_extension_notebook(json.loads(text))


def test_the_core_path_fits_in_90_minutes(estimates):
    total = course_map.core_path_minutes(estimates.values())
    per_notebook = {k: round(e.core_minutes) for k, e in estimates.items()
                    if not e.extension}
    assert total <= course_map.CORE_PATH_MINUTES, (
        f"the core path takes {total:.0f} minutes: {per_notebook}")
