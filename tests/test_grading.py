"""Tests of tlhelpers.grading: the fixture submissions (correct, partly
correct, crashing, looping, memory-hungry, edited, cheating, broken, from
another course, and one hostile or careless learner per case of the threat
model) grade, sandboxed and in SMOKE mode, into the expected gradebook;
no printed result, redefined checker, patched module, forged evidence file
or guessed seed raises a score; nothing a notebook starts outlives the
run."""

import csv
import io
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import psutil
import pytest
import torch

from tlhelpers import exercises, grading

FIXTURES = Path(__file__).parent / "fixtures" / "submissions"
# For all of a notebook's cells: generous for a loaded 2-core machine
# (the capstone trains in SMOKE mode), short enough that the endless
# loops end soon.
TIMEOUT = 90
MEMORY_MB = grading.MIN_MEMORY_MB   # honest work must pass at the minimum
GHOST = "tlh-fixture-ghost"
# file -> ({exercise: points}, total, max_points, status, phrases the
# message must contain)
EXPECTED = {
    "alice/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "1",
         "fix_the_script": "0"}, "2", "3", "ok",
        ["the answer to freeze_backbone is the reference solution, "
         "pasted verbatim"]),
    "bob/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "0",
         "fix_the_script": "0"}, "1", "3", "ok",
        ["discriminative_lrs: incorrect: every parameter has the same "
         "learning rate"]),
    "broken.ipynb": ({}, "0", "0", "invalid notebook",
                     ["not a notebook: invalid JSON"]),
    "carol/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "1",
         "fix_the_script": "0"}, "2", "3",
        "cell errors",
        ["cell 3 (accuracy = 1 / 0) raised ZeroDivisionError",
         "cell 7 (print(undefined_name)) raised NameError"]),
    # The endless loop spends the whole budget: the cells after it,
    # including the second answer, do not run.
    "dave/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "0",
         "fix_the_script": "0"}, "1", "3",
        "timeout",
        ["cell 6 (import time) ran past the time limit and was "
         "interrupted", "cell(s) did not run: the time limit (90 s for all "
         "cells) was spent", "discriminative_lrs: not attempted"]),
    "frank/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "1",
         "fix_the_script": "0"}, "2", "3",
        "memory limit",
        ["cell 3 (hog = bytearray(64 * 2**30)",
         f"ran out of memory ({MEMORY_MB} MB allowed)",
         "cell 4 (hogs = [bytearray"]),
    "grace/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "0",
         "fix_the_script": "0"}, "1", "3",
        "edited checks",
        ["the check cell of freeze_backbone was deleted",
         "the check cell of discriminative_lrs was edited",
         "discriminative_lrs: incorrect"]),
    "kim/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "1"}, "1", "1", "ok", []),
    "lee/03_fine_tuning.ipynb": (
        {"freeze_backbone": "0", "discriminative_lrs": "0",
         "fix_the_script": "0"}, "0", "3", "ok",
        ["freeze_backbone: not attempted", "still the placeholder"]),
    "mallory/03_fine_tuning.ipynb": (
        {"freeze_backbone": "0", "discriminative_lrs": "0",
         "fix_the_script": "0"}, "0", "3", "ok",
        ["freeze_backbone: incorrect: the new head is frozen",
         "discriminative_lrs: incorrect"]),
    "other_course.ipynb": ({}, "0", "0", "not this course",
                           ["no cell of it is tagged exercise:<name>"]),
    # 1. The canary finds no seed, command line, environment or public
    # held-out images; it answers nothing.
    "seed_thief/02_feature_extraction.ipynb": (
        {"train_probe": "0", "pick_layer": "0"}, "0", "2", "cell errors",
        ["LookupError: leaks: none", "train_probe: not attempted"]),
    # 2. Forged files, patched modules, claims in the kernel: no points.
    "forger/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "0"}, "0", "1", "ok",
        ["pick_strategy: incorrect"]),
    "patcher/03_fine_tuning.ipynb": (
        {"freeze_backbone": "0", "discriminative_lrs": "0",
         "fix_the_script": "0"}, "0", "3", "ok",
        ["freeze_backbone: incorrect: the new head is frozen",
         "discriminative_lrs: incorrect"]),
    "ivan/06_capstone.ipynb": (
        {"capstone": "0"}, "0", "2", "ok",
        ["capstone: incorrect: the backbone still has exactly its ImageNet "
         "weights"]),
    "blackhole/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "0"}, "0", "1", "grader error",
        ["the recording cell ran but wrote nothing for pick_strategy"]),
    # 3. The vandal cannot touch its own held-out copy or anyone else's.
    "vandal/02_feature_extraction.ipynb": (
        {"train_probe": "1", "pick_layer": "0"}, "1", "2", "ok",
        ["pick_layer: not attempted"]),
    # 4. Honest work at the smallest memory limit accepted, scored here.
    "hana/06_capstone.ipynb": (
        {"capstone": "2"}, "2", "2", "ok",
        ["the answer to capstone is the reference solution"]),
    # 5. The daemon and the forged kernel.pid change nothing.
    "ghost/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "1"}, "1", "1", "ok", []),
    # 6. Names that share a slug.
    "Jos\u00e9/other_course.ipynb": ({}, "0", "0", "not this course", []),
    "Jos\u00e8/other_course.ipynb": ({}, "0", "0", "not this course", []),
    # 7. Hidden folders, links, formulas, /dev/shm, time in all, answers
    # that raise SystemExit, malformed metadata and cells, duplicates.
    ".x/other_course.ipynb": ({}, "0", "0", "not this course", []),
    "..x/other_course.ipynb": ({}, "0", "0", "not this course", []),
    "=HYPERLINK(1)/other_course.ipynb": ({}, "0", "0", "not this course",
                                         []),
    "sym/03_fine_tuning.ipynb": ({}, "0", "0", "invalid notebook",
                                 ["a symbolic link, not a notebook"]),
    "shm/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "1"}, "1", "1", "memory limit",
        ["filled /tmp or /dev/shm, which count against the memory limit"]),
    "slowpoke/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "0"}, "0", "1", "timeout",
        ["ran past the time limit and was interrupted",
         "cell(s) did not run: the time limit (90 s for all cells) was "
         "spent", "pick_strategy: not attempted"]),
    "exit_answer/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "0"}, "0", "1", "cell errors",
        ["raised SystemExit",
         "pick_strategy: incorrect: reading your answer raised SystemExit"]),
    "badspec/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "1"}, "1", "1", "ok",
        ["the notebook's kernelspec metadata is not valid (ignored)"]),
    "intsource/05_choosing_a_strategy.ipynb": (
        {}, "0", "0", "invalid notebook",
        ["cell 2 has a source that is not text"]),
    # Two copies: the one named as the course notebook is credited.
    "dup/05_choosing_a_strategy (copy).ipynb": (
        {"pick_strategy": "0"}, "0", "0", "ok",
        ["pick_strategy is also answered in dup/05_choosing_a_strategy"
         ".ipynb: counted once, there"]),
    "dup/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "1"}, "1", "1", "ok", []),
    "stray/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "1",
         "pick_strategy": "0", "fix_the_script": "0"}, "2", "3",
        "ok",
        ["pick_strategy belongs in 05_choosing_a_strategy, not "
         "03_fine_tuning", "pick_strategy is also answered in "
         "stray/05_choosing_a_strategy.ipynb: counted once, there"]),
    "stray/05_choosing_a_strategy.ipynb": (
        {"pick_strategy": "1"}, "1", "1", "ok", []),
    # 8. The exercises that need thought: a layer picked from a real
    # measurement, and an early one picked from made-up numbers, which
    # the grader's own measurement on its own images refutes.
    "pia/02_feature_extraction.ipynb": (
        {"train_probe": "0", "pick_layer": "1"}, "1", "2", "ok",
        ["train_probe: not attempted",
         "the answer to pick_layer is the reference solution"]),
    "quinn/02_feature_extraction.ipynb": (
        {"train_probe": "0", "pick_layer": "0"}, "0", "2", "ok",
        ["pick_layer: incorrect: on the checker's own images a probe "
         "after stage2 reaches", "below the best"]),
    "nina/04_progressive_unfreezing.ipynb": (
        {"unfreeze_by_hand": "1"}, "1", "1", "ok", []),
    "omar/04_progressive_unfreezing.ipynb": (
        {"unfreeze_by_hand": "0"}, "0", "1", "ok",
        ["unfreeze_by_hand: incorrect: in epoch 1 stem, stage1, stage2, "
         "stage3 and 5 more train with the head"]),
    # The planted bugs: fixed (trained and measured by the grader on
    # its own held-out images), and the script handed in unchanged.
    "rosa/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "1",
         "fix_the_script": "1"}, "3", "3", "ok",
        ["the answer to fix_the_script is the reference solution"]),
    "sam/03_fine_tuning.ipynb": (
        {"freeze_backbone": "1", "discriminative_lrs": "1",
         "fix_the_script": "0"}, "2", "3", "ok",
        ["fix_the_script: incorrect: the BatchNorm statistics of frozen "
         "groups moved in training"]),
}


def _rows(csv_text):
    return list(csv.DictReader(io.StringIO(csv_text)))


def _sandbox_or_skip():
    problem = grading.sandbox_problem()
    if problem and os.environ.get("CI"):
        pytest.fail(f"CI must grade in the sandbox: {problem}")
    if problem:
        pytest.skip(f"no sandbox here: {problem}")


# ------------------------------------------------ the fixture set, graded


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade every fixture once, sandboxed, in SMOKE mode; share it all.

    A decoy process with "ipykernel" in its command line runs meanwhile:
    no forged kernel.pid may get it killed.
    """
    _sandbox_or_skip()
    out = tmp_path_factory.mktemp("grades") / "gradebook.csv"
    decoy = subprocess.Popen([sys.executable, "-c",
                              "import time; time.sleep(900)",
                              "ipykernel-decoy"])
    drawn = []

    def spy(n, real=secrets.randbelow):
        drawn.append(real(n))
        return drawn[-1]

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grading.secrets, "randbelow", spy)
            mp.setenv("TLH_SMOKE", "1")
            book = grading.grade([FIXTURES], out=out, timeout=TIMEOUT,
                                 memory_mb=MEMORY_MB, jobs=3,
                                 progress=False)
        after = {
            "ghosts": [p.pid for p in psutil.process_iter(["cmdline"])
                       if GHOST in " ".join(p.info["cmdline"] or [])],
            "decoy alive": decoy.poll() is None,
            "shm files": sorted(Path("/dev/shm").glob("tlh-fixture-*")),
            "seed": drawn[0] if drawn else None}
    finally:
        decoy.kill()
        decoy.wait()
    return book, out, after


@pytest.mark.slow
def test_fixture_set_grades_into_the_expected_gradebook(graded):
    book, out, _ = graded
    rows = _rows(out.read_text())
    assert list(rows[0])[:2] == ["student", "file"]
    assert list(rows[0])[-5:] == ["total", "max_points", "status",
                                  "message", "seed"]
    for row in rows:  # the formula is written as text: '=HYPERLINK(1)
        if row["file"].startswith("'="):
            row["file"] = row["file"][1:]
    assert sorted(r["file"] for r in rows) == sorted(EXPECTED)
    for row in rows:
        points, total, max_points, status, phrases = EXPECTED[row["file"]]
        got = {name: row[name] for name in book.exercises if row[name]}
        assert (got, row["total"], row["max_points"], row["status"]) == (
            points, total, max_points, status), (row["file"],
                                                 row["message"])
        for phrase in phrases:
            assert phrase in row["message"], (row["file"], phrase)
    assert {r["seed"] for r in rows} == {"drawn"}
    assert all(r.seconds > 0 for r in book.rows
               if r.status not in ("invalid notebook", "not this course"))


@pytest.mark.slow
def test_the_secret_seed_is_drawn_and_never_written(graded):
    book, out, after = graded
    assert after["seed"] is not None
    assert after["seed"] != exercises.GRADING_SEED
    written = [out] + list(out.with_name("gradebook_feedback").iterdir())
    for path in written:
        assert str(after["seed"]) not in path.read_text(), path


@pytest.mark.slow
def test_nothing_a_notebook_started_outlives_the_run(graded):
    """The ghost's daemon is gone, the decoy named in its forged
    kernel.pid still runs, and /dev/shm keeps nothing."""
    _, _, after = graded
    assert after["ghosts"] == []
    assert after["decoy alive"]
    assert after["shm files"] == []


@pytest.mark.slow
def test_cheating_raises_no_score(graded):
    """Fake prints, stored outputs, a redefined check, a monkeypatched
    exercises module and an edited check cell all leave the points at 0."""
    book, _, _ = graded
    by_file = {r.file: r for r in book.rows}
    mallory = by_file["mallory/03_fine_tuning.ipynb"]
    assert mallory.total == 0
    assert {mallory.results[name].status for name in (
        "freeze_backbone", "discriminative_lrs")} == {"incorrect"}
    grace = by_file["grace/03_fine_tuning.ipynb"]
    assert grace.results["discriminative_lrs"].points == 0
    source = (FIXTURES / "mallory" / "03_fine_tuning.ipynb").read_text()
    assert "real.Exercise.grade" in source and "correct" in source


@pytest.mark.slow
def test_accuracy_is_measured_by_the_grader_on_intact_heldout_copies(
        graded):
    """The vandal's own held-out copy survived its attack (its honest
    probe is measured on it), and so did the canary's (no grader error);
    the capstone's claimed accuracy and patched forward earn nothing."""
    book, _, _ = graded
    by_file = {r.file: r for r in book.rows}
    probe = by_file["vandal/02_feature_extraction.ipynb"].results[
        "train_probe"]
    assert probe.passed and "the probe classifies" in probe.message
    assert "held-out images the checker drew" in probe.message
    assert by_file["seed_thief/02_feature_extraction.ipynb"].status == (
        "cell errors")
    honest = by_file["hana/06_capstone.ipynb"].results["capstone"]
    assert honest.passed and "final_model classifies" in honest.message
    assert by_file["ivan/06_capstone.ipynb"].total == 0


@pytest.mark.slow
def test_feedback_file_per_learner_explains_each_exercise(graded):
    book, out, _ = graded
    folder = out.with_name("gradebook_feedback")
    names = book.feedback_files()
    assert sorted(p.name for p in folder.glob("*.md")) == sorted(
        names.values())
    bob = (folder / names["bob"]).read_text()
    assert "## bob/03_fine_tuning.ipynb: 1 of 3 points" in bob
    assert "### discriminative_lrs: incorrect (0/1)" in bob
    assert "Hint: " in bob
    carol = (folder / names["carol"]).read_text()
    assert "cell 3 (accuracy = 1 / 0) raised ZeroDivisionError" in carol
    for name in ("Jos\u00e9", "Jos\u00e8"):
        text = (folder / names[name]).read_text()
        assert text.startswith(f"# Feedback for {name}\n")


@pytest.mark.slow
def test_a_formula_in_a_learner_name_stays_text(graded):
    _, out, _ = graded
    text = out.read_text()
    assert "\n'=HYPERLINK(1),'=HYPERLINK(1)/other_course.ipynb," in text
    assert "\n=HYPERLINK" not in text


@pytest.mark.slow
def test_regrading_with_a_given_seed_gives_the_same_rows(
        graded, tmp_path, monkeypatch, capsys):
    """A few learners through the command, in reverse order, fewer jobs:
    the same rows, and the seed reads "given"."""
    _, first, _ = graded
    monkeypatch.setenv("TLH_SMOKE", "1")
    out = tmp_path / "again.csv"
    learners = ["kim", "bob", "broken.ipynb", "other_course.ipynb"]
    code = grading.main([str(FIXTURES / p) for p in learners] + [
        "--out", str(out), "--timeout", str(TIMEOUT), "--memory-mb",
        str(MEMORY_MB), "--jobs", "2", "--seed", "5", "--no-progress"])
    assert code == 0
    again = _rows(out.read_text())
    before = {r["file"]: r for r in _rows(first.read_text())}
    for row in again:
        assert row.pop("seed") == "given"
        old = before[row["file"]]
        assert {k: old[k] for k in row} == row, (old, row)
    assert "Gradebook" in capsys.readouterr().out


def _unsandboxed(paths, **kwargs):
    """Grade without the sandbox (no kernel in these tests), warned."""
    with pytest.warns(UserWarning, match="without a sandbox"):
        return grading.grade(paths, progress=False, sandbox=False, **kwargs)


# --------------------------------------------------- finding submissions


def test_submissions_are_named_after_learners_in_a_stable_order(tmp_path):
    for rel in ("zoe/03_fine_tuning.ipynb", "adam.ipynb",
                "bea/week5/05_choosing_a_strategy.ipynb",
                ".x/05_choosing_a_strategy.ipynb"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    subs = grading.find_submissions([tmp_path])
    assert [(s.student, s.file) for s in subs] == [
        (".x", ".x/05_choosing_a_strategy.ipynb"),
        ("adam", "adam.ipynb"),
        ("bea", "bea/week5/05_choosing_a_strategy.ipynb"),
        ("zoe", "zoe/03_fine_tuning.ipynb")]
    for alone in (tmp_path / "zoe", tmp_path / "zoe" /
                  "03_fine_tuning.ipynb"):
        single = grading.find_submissions([alone])
        assert [(s.student, s.file) for s in single] == [
            ("zoe", "zoe/03_fine_tuning.ipynb")]
    assert grading.find_submissions([tmp_path, tmp_path / "adam.ipynb"]) \
        == subs


def test_skipped_files_are_reported_and_links_get_a_row(tmp_path):
    checkpoint = tmp_path / "zoe" / ".ipynb_checkpoints" / "a.ipynb"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("{}")
    (tmp_path / "zoe" / "03_fine_tuning.ipynb").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.ipynb").write_text("{}")
    (tmp_path / "zoe" / "linked").symlink_to(tmp_path / "outside")
    (tmp_path / "zoe" / "copy.ipynb").symlink_to(
        tmp_path / "zoe" / "03_fine_tuning.ipynb")
    skipped = []
    subs = grading.find_submissions([tmp_path / "zoe"], skipped)
    assert [(s.file, bool(s.problem)) for s in subs] == [
        ("zoe/03_fine_tuning.ipynb", False), ("copy.ipynb", True)] or [
        (s.file, bool(s.problem)) for s in subs] == [
        ("copy.ipynb", True), ("zoe/03_fine_tuning.ipynb", False)]
    reasons = {p.name: why for p, why in skipped}
    assert reasons == {".ipynb_checkpoints": "an editor's checkpoint copies",
                       "linked": "a link to a folder (links are not "
                                 "followed)"}


def test_skipped_files_are_printed(tmp_path, capsys):
    checkpoint = tmp_path / ".ipynb_checkpoints" / "a.ipynb"
    checkpoint.parent.mkdir()
    checkpoint.write_text("{}")
    shutil.copy(FIXTURES / "other_course.ipynb", tmp_path / "kim.ipynb")
    book = _unsandboxed([tmp_path])
    assert [r.status for r in book.rows] == ["not this course"]
    assert "skipped" in capsys.readouterr().err


def test_missing_paths_and_empty_folders_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebook or folder"):
        grading.find_submissions([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no notebooks"):
        grading.find_submissions([tmp_path])


def test_command_exits_2_on_a_missing_path_and_keeps_the_gradebook(
        tmp_path, capsys):
    out = tmp_path / "gradebook.csv"
    out.write_text("old gradebook\n")
    assert grading.main([str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no notebook or folder" in capsys.readouterr().err
    assert out.read_text() == "old gradebook\n"


def test_without_bwrap_the_grader_refuses_and_says_what_to_do(
        tmp_path, monkeypatch, capsys):
    shutil.copy(FIXTURES / "other_course.ipynb", tmp_path / "kim.ipynb")
    out = tmp_path / "gradebook.csv"
    monkeypatch.setattr(grading.shutil, "which", lambda name: None)
    assert grading.main([str(tmp_path), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "bubblewrap (bwrap) is not installed" in err
    assert "apt-get install bubblewrap" in err and "--no-sandbox" in err
    assert not out.exists()
    assert grading.main([str(tmp_path), "--out", str(out), "--no-sandbox",
                         "--no-progress"]) == 0
    assert "without a sandbox" in capsys.readouterr().err
    assert out.exists()


def test_help_lists_the_exit_codes_and_timeout_zero(capsys):
    with pytest.raises(SystemExit):
        grading.main(["--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "0: no limit" in " ".join(text.split())
    for code in ("0", "1", "2", "3", "130"):
        assert f"\n  {code} " in text
    args = grading.build_parser().parse_args(["x", "--timeout", "0"])
    assert args.timeout == 0


@pytest.mark.parametrize("jobs", ["0", "-1", "1.5", "two"])
def test_grade_jobs_option_rejects_what_is_not_a_count(jobs, capsys):
    """The same --jobs as tlcourse run: a whole number, 1 or more."""
    with pytest.raises(SystemExit) as stop:
        grading.build_parser().parse_args(["x", "--jobs", jobs])
    assert stop.value.code == 2
    assert "give a whole number, 1 or more" in capsys.readouterr().err
    assert grading.build_parser().parse_args(["x", "--jobs", "3"]).jobs == 3


# ---------------------------------------------------- reading notebooks


@pytest.mark.parametrize("text, phrase", [
    ('{"cells": [', "invalid JSON"),
    ('["a list"]', "no list of cells"),
    ('{"cells": [], "nbformat": 99}', "not a notebook"),
    ('{"cells": [{"cell_type": "code", "source": 42}]}',
     "cell 1 has a source that is not text"),
    ('{"cells": [{"cell_type": "code", "source": "", "metadata": '
     '{"tags": "exercise:x"}}]}', "cell 1 has tags that are not a list"),
])
def test_unreadable_files_are_not_notebooks(tmp_path, text, phrase):
    path = tmp_path / "x.ipynb"
    path.write_text(text)
    nb, problem = grading._read_notebook(path)
    assert nb is None and phrase in problem


def test_binary_files_are_not_notebooks(tmp_path):
    path = tmp_path / "x.ipynb"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert "not UTF-8" in grading._read_notebook(path)[1]


def _fixture(name):
    nb, problem = grading._read_notebook(FIXTURES / name)
    assert problem is None
    return nb


def test_a_kernelspec_that_is_not_an_object_is_ignored_with_a_note():
    nb = _fixture("badspec/05_choosing_a_strategy.ipynb")
    language, remarks = grading._language(nb)
    assert language == "python"
    assert remarks == ["the notebook's kernelspec metadata is not valid "
                       "(ignored)"]
    assert "kernelspec" not in nb.metadata


def test_a_notebook_expects_every_exercise_of_its_course_notebook():
    nb = _fixture("grace/03_fine_tuning.ipynb")
    assert grading._expected_exercises(nb) == [
        "freeze_backbone", "discriminative_lrs", "fix_the_script"]
    assert grading._expected_exercises(_fixture("other_course.ipynb")) == []
    # Tags stripped by an editor: the check calls still identify it.
    nb = _fixture("alice/03_fine_tuning.ipynb")
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    assert grading._expected_exercises(nb) == [
        "freeze_backbone", "discriminative_lrs", "fix_the_script"]


def test_deleted_and_edited_check_cells_are_noted():
    nb = _fixture("grace/03_fine_tuning.ipynb")
    notes = grading._convention_notes(
        nb, ["freeze_backbone", "discriminative_lrs"])
    assert notes == [
        "the check cell of freeze_backbone was deleted (graded from your "
        "answer anyway)",
        "the check cell of discriminative_lrs was edited (graded from your "
        "answer anyway)"]
    assert grading._convention_notes(
        _fixture("alice/03_fine_tuning.ipynb"),
        ["freeze_backbone", "discriminative_lrs"]) == []


def test_pasted_solutions_and_exercises_out_of_place_are_remarked():
    nb = _fixture("stray/03_fine_tuning.ipynb")
    expected = grading._expected_exercises(nb)
    assert expected == ["freeze_backbone", "discriminative_lrs",
                        "fix_the_script", "pick_strategy"]
    assert grading._remarks(nb, expected, "03_fine_tuning") == [
        "the answer to freeze_backbone is the reference solution, pasted "
        "verbatim",
        "the answer to pick_strategy is the reference solution, pasted "
        "verbatim",
        "pick_strategy belongs in 05_choosing_a_strategy, not "
        "03_fine_tuning (graded here, counted once)"]


def test_recording_cells_follow_each_exercise_and_end_the_notebook(
        tmp_path):
    nb = _fixture("alice/03_fine_tuning.ipynb")
    nb.cells[1].metadata["tlhelpers_grader"] = True  # a learner's forgery
    before = len(nb.cells)
    nb = grading._instrument(nb, ["freeze_backbone", "discriminative_lrs"],
                             tmp_path / "outbox", tmp_path / "heldout")
    added = [i for i, c in enumerate(nb.cells)
             if c.metadata.get("tlhelpers_grader")]
    assert len(nb.cells) == before + 3
    assert added == [5, 8, 11]   # fix_the_script's cells: 9 and 10
    assert "check:freeze_backbone" in nb.cells[4].metadata["tags"]
    assert str(Path(grading.__file__).resolve()) in nb.cells[5].source
    assert "['freeze_backbone']" in nb.cells[5].source
    tokens = [nb.cells[i].metadata["tlhelpers_grader"]["token"]
              for i in added]
    assert len(set(tokens)) == 3 and all(len(t) == 32 for t in tokens)
    assert tokens[0] in nb.cells[5].source
    assert nb.cells[11].metadata["tlhelpers_grader"]["suffix"] == ".final"
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code")


def _record(tmp_path, namespace, names=("pick_strategy",), heldout=None):
    """Run a recording cell's code in `namespace`; return evidence."""
    nb = _fixture("kim/05_choosing_a_strategy.ipynb")
    outbox = tmp_path / "outbox"
    outbox.mkdir(exist_ok=True)
    nb = grading._instrument(nb, list(names), outbox,
                             heldout or tmp_path / "heldout")
    cell = nb.cells[-1]
    exec(cell.source, namespace)
    evidence = tmp_path / "evidence"
    evidence.mkdir(exist_ok=True)
    assert grading._collect_evidence(cell, outbox, evidence) == []
    return {n: torch.load(evidence / f"{n}.final.pt", weights_only=True)
            for n in names}


def test_recording_uses_fresh_checks_whatever_the_kernel_patched(
        tmp_path, monkeypatch):
    """Patched exercises, files and config modules do not reach the
    recording, and the kernel's modules are put back afterwards."""
    import tlhelpers.config
    import tlhelpers.files

    monkeypatch.setattr(exercises.PickStrategy, "_collect",
                        lambda self, strategies: {"faked": True})
    monkeypatch.setattr(tlhelpers.files, "save", lambda *a, **k: None)
    monkeypatch.setattr(tlhelpers.config, "by_mode", lambda a, b: a)
    namespace = {"strategies": {"few_near": "from_scratch"}}
    evidence = _record(tmp_path, namespace)["pick_strategy"]
    assert "faked" not in evidence
    assert not exercises.pick_strategy.grade(evidence).passed
    assert "_tlh_grader_record" not in namespace
    assert sys.modules["tlhelpers.exercises"] is exercises
    assert exercises.PickStrategy._collect(None, None) == {"faked": True}


def test_an_answer_that_raises_systemexit_is_recorded_as_incorrect(
        tmp_path):
    class Leaving(dict):
        def __getattribute__(self, name):
            raise SystemExit("bye")

    evidence = _record(tmp_path, {"strategies": Leaving()})["pick_strategy"]
    result = exercises.pick_strategy.grade(evidence)
    assert result.status == "incorrect"
    assert "raised SystemExit" in result.message


def test_missing_heldout_images_stop_the_recording_loudly(tmp_path):
    """A missing copy is the grader's fault: never a silent 0."""
    with pytest.raises(RuntimeError, match="held-out images for capstone "
                                           "are missing"):
        _record(tmp_path, {"final_model": object()}, ["capstone"],
                heldout=tmp_path / "missing")


@pytest.mark.slow
def test_the_text_exercise_is_judged_on_sentences_the_grader_draws(
        tmp_path, monkeypatch):
    """Held-out sentences travel like images; the kernel never sees their
    labels, and the grader rebuilds the model from its saved weights."""
    monkeypatch.setenv("TLH_SMOKE", "1")
    heldout = grading._HeldOut(tmp_path / "heldout", seed=1234)
    sentences, labels = heldout.get("text_classifier")
    assert all(isinstance(s, str) for s in sentences)
    saved = torch.load(heldout.file("text_classifier"), weights_only=True)
    assert saved == sentences  # the kernel's copy: sentences, no labels
    namespace = {}
    exec(exercises.text_classifier.solution_code, namespace)
    evidence = _record(tmp_path, namespace, ["text_classifier"],
                       heldout=heldout.folder)["text_classifier"]
    result = exercises.text_classifier.grade(
        evidence, heldout.get("text_classifier"))
    assert result.passed, result
    from tlhelpers.models import load_pretrained

    untrained = _record(tmp_path, {"topic_model": load_pretrained(
        "minilm_l6", num_classes=4)}, ["text_classifier"],
        heldout=heldout.folder)["text_classifier"]
    result = exercises.text_classifier.grade(
        untrained, heldout.get("text_classifier"))
    assert result.status == "incorrect" and "sentences" in result.message


def test_only_the_grader_cells_own_files_are_taken(tmp_path):
    """Files the notebook wrote, and links, are left in the outbox."""
    outbox, evidence = tmp_path / "outbox", tmp_path / "evidence"
    outbox.mkdir()
    evidence.mkdir()
    nb = grading._instrument(_fixture("kim/05_choosing_a_strategy.ipynb"),
                             ["pick_strategy"], outbox, tmp_path)
    cell = nb.cells[-1]
    token = cell.metadata["tlhelpers_grader"]["token"]
    (outbox / "pick_strategy.final.pt").write_text("forged")
    (tmp_path / "secret").write_text("the instructor's file")
    (outbox / f"{token}-pick_strategy.pt").symlink_to(tmp_path / "secret")
    assert grading._collect_evidence(cell, outbox, evidence) == [
        "pick_strategy"]
    assert list(evidence.iterdir()) == []


# ------------------------------------------------- judging an outcome


def _outcome(tmp_path, report, expected=("pick_strategy",), notes=()):
    sub = grading.Submission(tmp_path / "x.ipynb", "x", "x.ipynb")
    return {"sub": sub, "expected": list(expected), "notes": list(notes),
            "status": None, "report": report, "evidence": tmp_path}


def _report(kernel="ok", cells=(), skipped=0):
    return {"kernel": kernel, "cells": list(cells), "recorder_errors": [],
            "skipped": skipped}


def _save(tmp_path, strategies, suffix=""):
    evidence = exercises.pick_strategy.collect({"strategies": strategies})
    torch.save(evidence, tmp_path / f"pick_strategy{suffix}.pt")


def test_the_answer_after_the_exercise_beats_the_one_at_the_end(tmp_path):
    solved = {}
    exec(exercises.pick_strategy.solution_code, solved)
    _save(tmp_path, solved["strategies"])
    _save(tmp_path, ..., ".final")
    row = grading._judge(_outcome(tmp_path, _report()), {}, tmp_path, 100)
    assert row.results["pick_strategy"].passed
    assert row.status == "ok" and row.message == ""


def test_a_missing_answer_file_means_the_notebook_stopped_before(tmp_path):
    row = grading._judge(_outcome(tmp_path, _report("died")), {}, tmp_path,
                         100)
    assert row.status == "kernel died"
    assert row.results["pick_strategy"].status == "not attempted"
    assert "stopped before this exercise" in row.message


def test_status_is_the_most_serious_condition(tmp_path):
    cells = [{"cell": 2, "first_line": "x = 1/0", "ename":
              "ZeroDivisionError", "evalue": "division by zero",
              "timed_out": False},
             {"cell": 4, "first_line": "big()", "ename": "MemoryError",
              "evalue": "", "timed_out": False}]
    row = grading._judge(_outcome(tmp_path, _report(cells=cells),
                                  notes=["the check cell of x was edited"]),
                         {}, tmp_path, 512)
    assert row.status == "memory limit"
    assert row.notes[1:] == [
        "cell 2 (x = 1/0) raised ZeroDivisionError: division by zero",
        "cell 4 (big()) ran out of memory (512 MB allowed): MemoryError"]


def test_cells_skipped_for_time_are_a_timeout(tmp_path):
    row = grading._judge(_outcome(tmp_path, _report(skipped=3)), {},
                         tmp_path, 100, timeout=10)
    assert row.status == "timeout"
    assert row.notes == ["3 cell(s) did not run: the time limit (10 s for "
                         "all cells) was spent"]


@pytest.mark.slow
def test_a_cell_that_ignores_its_interrupt_is_named_when_killed(tmp_path):
    """The watchdog kills the kernel; the row still says which cell ran
    past the limit, and that the kernel was stopped."""
    _sandbox_or_skip()
    nb = _fixture("slowpoke/05_choosing_a_strategy.ipynb")
    first = next(c for c in nb.cells if "time.sleep" in c.source)
    first.source = ("import signal, time\n"
                    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                    "while True:\n    time.sleep(0.1)")
    (tmp_path / "stubborn").mkdir()
    nbformat.write(nb, tmp_path / "stubborn" / "05_choosing_a_strategy.ipynb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLH_SMOKE", "1")
        book = grading.grade([tmp_path / "stubborn"],
                             out=tmp_path / "book.csv", timeout=5,
                             progress=False)
    (row,) = book.rows
    assert row.status == "timeout"
    assert f"cell {nb.cells.index(first) + 1} (" in row.message
    assert "ran past the time limit and was interrupted" in row.message
    assert "stopped at the time limit (a cell did not obey" in row.message


def test_messages_hide_grading_folders_and_addresses(tmp_path):
    text = f"open {tmp_path}/a.pt failed at <object at 0x7f3a2b1c9d40>"
    assert grading._clean(text, tmp_path) == (
        "open <grading folder>/a.pt failed at <object at 0x...>")


class Sneaky:
    """Any class: unpickling it could run code, so it must not load."""


def test_evidence_that_is_not_plain_data_is_ignored(tmp_path):
    torch.save({"exercise": "pick_strategy", "x": Sneaky()},
               tmp_path / "pick_strategy.pt")
    assert grading._load_evidence(tmp_path / "pick_strategy.pt",
                                  "pick_strategy") is None
    torch.save({"exercise": "capstone"}, tmp_path / "other.pt")
    assert grading._load_evidence(tmp_path / "other.pt",
                                  "pick_strategy") is None


def _result(name, points, status="correct"):
    return exercises.Result(name, status, "", points, 1.0)


def test_an_exercise_is_counted_once_per_learner_home_first():
    rows = [grading.GradedNotebook("a", "a/03_fine_tuning.ipynb", "ok",
                                   results={"pick_strategy":
                                            _result("pick_strategy", 1)}),
            grading.GradedNotebook("a", "a/05_choosing_a_strategy.ipynb",
                                   "ok",
                                   results={"pick_strategy":
                                            _result("pick_strategy", 1)}),
            grading.GradedNotebook("b", "b/05_choosing_a_strategy.ipynb",
                                   "ok",
                                   results={"pick_strategy":
                                            _result("pick_strategy", 1)})]
    grading._count_once(rows)
    assert [(r.total, r.max_points) for r in rows] == [(0, 0), (1, 1),
                                                       (1, 1)]
    assert rows[0].notes == [
        "pick_strategy is also answered in a/05_choosing_a_strategy.ipynb:"
        " counted once, there"]


# ---------------------------------------------------- writing safely


def _book():
    result = exercises.Result("pick_strategy", "correct", "", 1.0, 1.0)
    row = grading.GradedNotebook("kim", "kim.ipynb", "ok",
                                 results={"pick_strategy": result},
                                 seconds=3.0)
    return grading.Gradebook(["pick_strategy"], [row], seed="drawn")


def test_gradebook_csv_has_points_total_status_and_no_timings(tmp_path):
    out = tmp_path / "book.csv"
    written = _book().write(out)
    assert out.read_text() == (
        "student,file,pick_strategy,total,max_points,status,message,seed\n"
        "kim,kim.ipynb,1,1,1,ok,,drawn\n")
    assert written == [tmp_path / "book_feedback" /
                       grading.feedback_name("kim")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "book.csv", "book_feedback"]
    assert "Gradebook" in str(_book())


@pytest.mark.parametrize("value", ["=1+1", "+cmd", "-cmd", "@SUM(A1)",
                                   "\t=1", "\r=1"])
def test_csv_cells_that_look_like_formulas_are_neutralised(value):
    assert grading._inert(value) == "'" + value
    assert grading._inert("alice") == "alice"
    assert grading._inert("-1.5") == "-1.5"


def test_feedback_names_are_readable_and_never_collide():
    names = ["Jos\u00e9", "Jos\u00e8", "Jose", "\u674e\u96f7",
             "\u674e\u96f6", "../etc", "a b"]
    files = [grading.feedback_name(n) for n in names]
    assert len(set(files)) == len(names)
    assert files[0].startswith("Jose-") and files[1].startswith("Jose-")
    assert files[3].startswith("learner-")
    assert all("/" not in f and f.endswith(".md") for f in files)
    assert grading.feedback_name("Jos\u00e9") == files[0]  # stable


def test_a_failed_write_leaves_the_old_gradebook_whole(tmp_path,
                                                       monkeypatch):
    out = tmp_path / "book.csv"
    out.write_text("the old gradebook\n")

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tlhelpers.files.write_text", full_disk)
    with pytest.raises(OSError):
        _book().write(out)
    assert out.read_text() == "the old gradebook\n"


def test_an_interrupted_run_writes_no_gradebook(tmp_path, monkeypatch):
    out = tmp_path / "book.csv"
    out.write_text("the old gradebook\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(grading, "_execute_submission", interrupted)
    shutil.copy(FIXTURES / "kim" / "05_choosing_a_strategy.ipynb",
                tmp_path / "kim.ipynb")
    with pytest.raises(KeyboardInterrupt):
        _unsandboxed([tmp_path / "kim.ipynb"], out=out)
    assert out.read_text() == "the old gradebook\n"


def test_a_grader_failure_on_one_notebook_is_a_row(tmp_path, monkeypatch):
    for name in ("a.ipynb", "b.ipynb"):
        shutil.copy(FIXTURES / "other_course.ipynb", tmp_path / name)
    real = grading._execute_submission

    def flaky(sub, *args):
        if sub.student == "a":
            raise RuntimeError("disk on fire")
        return real(sub, *args)

    monkeypatch.setattr(grading, "_execute_submission", flaky)
    book = _unsandboxed([tmp_path])
    assert [(r.student, r.status) for r in book.rows] == [
        ("a", "grader error"), ("b", "not this course")]
    assert "disk on fire" in book.rows[0].message
    assert book.seed == "drawn"
    book = _unsandboxed([tmp_path], seed=3)
    assert book.seed == "given"


def test_arguments_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        grading.grade([tmp_path], timeout=-1)
    with pytest.raises(ValueError, match="memory_mb must be at least "
                                         f"{grading.MIN_MEMORY_MB}"):
        grading.grade([tmp_path], memory_mb=1024)


def test_threat_model_is_documented():
    doc = grading.__doc__
    assert "Threat model" in doc and "does NOT stop" in doc
    assert "bubblewrap" in doc and "RLIMIT_AS" in doc


# ------------------------------------------------------------ sandbox


def test_the_sandbox_binds_only_what_the_kernel_needs(tmp_path):
    for name in ("heldout", "notebook", "ipc"):
        (tmp_path / name).mkdir()
    w = str(tmp_path)
    spec = {"env": {"HOME": f"{w}/home"}, "memory_mb": 2048,
            "read_only": [f"{w}/python", f"{w}/heldout"],
            "writable": [f"{w}/notebook", f"{w}/ipc"],
            "cwd": f"{w}/notebook"}
    argv = grading._sandbox_argv(spec)
    text = " ".join(argv)
    for flag in ("--unshare-all", "--die-with-parent", "--clearenv",
                 "--cap-drop ALL", "--proc /proc", "--dev /dev"):
        assert flag in text
    assert f"--size {2048 * 2**20} --tmpfs /dev/shm" in text
    assert f"--ro-bind {w}/heldout {w}/heldout" in text
    assert f"--bind {w}/notebook {w}/notebook" in text
    assert f"{w}/python" not in text  # missing folders are not bound
    assert "--ro-bind / /" not in text and "--share-net" not in text
    assert argv[-3:] == ["--chdir", f"{w}/notebook", "--"]


def test_a_kernel_gets_none_of_the_graders_environment(tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("INSTRUCTOR_TOKEN", "do-not-leak")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    env = grading._kernel_env(tmp_path, threads=1, sandbox=True)
    assert "INSTRUCTOR_TOKEN" not in env
    assert "do-not-leak" not in " ".join(env.values())
    assert env["HOME"] == str(tmp_path / "home")
    assert env["TORCH_HOME"] == str(tmp_path / "torch")
    assert env["TLH_OFFLINE"] == "1"


# --------------------------------------------- formats, roster, exit codes


def _class_folder(tmp_path):
    """Three learners' folders; no notebook of them needs a kernel."""
    for student in ("alice", "zed", "=cmd"):
        (tmp_path / "subs" / student).mkdir(parents=True)
        shutil.copy(FIXTURES / "other_course.ipynb",
                    tmp_path / "subs" / student / "other_course.ipynb")
    roster = tmp_path / "roster.csv"
    roster.write_text("id,name,email,section\n"
                      "s1,Alice Liddell,alice@example.org,A\n"
                      "s2,Bob Builder,bob@example.org,B\n")
    return tmp_path / "subs", roster


def _cli(argv):
    return grading.main([str(a) for a in argv]
                        + ["--no-sandbox", "--no-progress"])


def test_without_format_options_the_gradebook_is_todays(tmp_path):
    subs, _ = _class_folder(tmp_path)
    out = tmp_path / "gradebook.csv"
    assert _cli([subs, "--out", out, "--seed", 3]) == grading.EXIT_OK
    book = _unsandboxed([subs], seed=3)
    assert out.read_text() == book.to_csv()
    assert out.read_text().splitlines()[0].endswith("message,seed")


def test_wide_format_with_roster_lists_everyone_and_flags_strangers(
        tmp_path, capsys):
    subs, roster = _class_folder(tmp_path)
    out = tmp_path / "wide.csv"
    code = _cli([subs, "--out", out, "--roster", roster, "--format",
                 "wide"])
    assert code == grading.EXIT_OK
    rows = _rows(out.read_text())
    assert [(r["id"], r["name"]) for r in rows] == [
        ("s1", "Alice Liddell"), ("s2", "Bob Builder"), ("", "'=cmd"),
        ("", "zed")]
    assert rows[1]["total"] == "0" and "no submission" in rows[1]["notes"]
    assert "not on the roster" in rows[3]["notes"]
    err = capsys.readouterr().err
    assert "'zed' matches no one on the roster" in err
    assert "'=cmd' matches no one on the roster" in err
    # Feedback still goes to every learner who submitted.
    assert len(list((tmp_path / "wide_feedback").iterdir())) == 3


def test_canvas_format_has_points_possible_and_roster_learners_only(
        tmp_path, capsys):
    subs, roster = _class_folder(tmp_path)
    out = tmp_path / "canvas.csv"
    assert _cli([subs, "--out", out, "--roster", roster, "--format",
                 "canvas"]) == grading.EXIT_OK
    rows = _rows(out.read_text())
    assert list(rows[0])[:5] == ["Student", "ID", "SIS User ID",
                                 "SIS Login ID", "Section"]
    assert rows[0]["Student"] == "Points Possible"
    assert [r["SIS User ID"] for r in rows[1:]] == ["s1", "s2"]
    assert "left out of the Canvas import" in capsys.readouterr().err


def test_long_format_with_roster_flags_strangers_in_their_rows(tmp_path):
    subs, roster = _class_folder(tmp_path)
    out = tmp_path / "long.csv"
    assert _cli([subs, "--out", out, "--roster", roster]) == \
        grading.EXIT_OK
    rows = {r["student"]: r for r in _rows(out.read_text())}
    assert "not on the roster" in rows["zed"]["message"]
    assert "not on the roster" not in rows["alice"]["message"]


@pytest.mark.parametrize("option, content, phrase", [
    ("--roster", "name\nAlice\n", "needs the columns id and name"),
    ("--points", "[exercises]\nnope = 1\n", "names exercises this course"),
])
def test_bad_roster_or_points_stop_the_run_before_grading(
        tmp_path, capsys, monkeypatch, option, content, phrase):
    subs, _ = _class_folder(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    monkeypatch.setattr(grading, "_execute_submission", None)  # not run
    out = tmp_path / "g.csv"
    assert _cli([subs, "--out", out, option, bad]) == grading.EXIT_USAGE
    assert phrase in capsys.readouterr().err
    assert not out.exists()


def test_exit_status_says_some_notebooks_were_not_graded(
        tmp_path, monkeypatch, capsys):
    subs, _ = _class_folder(tmp_path)
    real = grading._execute_submission

    def flaky(sub, *args):
        if sub.student == "zed":
            raise RuntimeError("disk on fire")
        return real(sub, *args)

    monkeypatch.setattr(grading, "_execute_submission", flaky)
    out = tmp_path / "g.csv"
    assert _cli([subs, "--out", out]) == grading.EXIT_UNGRADED
    assert "1 notebook(s) not graded" in capsys.readouterr().err
    assert out.exists()
