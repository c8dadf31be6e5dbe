"""Tests of tlhelpers.grading: the fixture submissions (correct, partly
correct, crashing, looping, memory-hungry, edited, cheating, broken, from
another course) grade into the expected gradebook, the same on a rerun,
and no printed result, redefined checker or edited check cell raises a
score."""

import csv
import io
import shutil
from pathlib import Path

import pytest
import torch

from tlhelpers import exercises, grading

FIXTURES = Path(__file__).parent / "fixtures" / "submissions"
# Generous for a loaded 2-core machine (a kernel starts in about 5 s),
# short enough that the endless loops end soon.
TIMEOUT = 30
MEMORY_MB = 2048
COLUMNS = ["student", "file", "freeze_backbone", "discriminative_lrs",
           "pick_strategy", "total", "max_points", "status", "message"]
# student -> (freeze_backbone, discriminative_lrs, pick_strategy, total,
#             max_points, status, phrases the message must contain)
EXPECTED = {
    "alice": ("1", "1", "", "2", "2", "ok", []),
    "bob": ("1", "0", "", "1", "2", "ok",
            ["discriminative_lrs: incorrect: every parameter has the same "
             "learning rate"]),
    "broken": ("", "", "", "0", "0", "invalid notebook",
               ["not a notebook: invalid JSON"]),
    "carol": ("1", "1", "", "2", "2", "cell errors",
              ["cell 3 (accuracy = 1 / 0) raised ZeroDivisionError",
               "cell 7 (print(undefined_name)) raised NameError"]),
    "dave": ("1", "1", "", "2", "2", "timeout",
             ["cell 6 (import time) ran past the time limit and was "
              "interrupted", "stopped at the time limit"]),
    "frank": ("1", "1", "", "2", "2", "memory limit",
              ["cell 3 (hog = bytearray(64 * 2**30)",
               "ran out of memory (2048 MB allowed)",
               "cell 4 (hogs = [bytearray"]),
    "grace": ("1", "0", "", "1", "2", "edited checks",
              ["the check cell of freeze_backbone was deleted",
               "the check cell of discriminative_lrs was edited",
               "discriminative_lrs: incorrect"]),
    "kim": ("", "", "1", "1", "1", "ok", []),
    "lee": ("0", "0", "", "0", "2", "ok",
            ["freeze_backbone: not attempted", "still the placeholder"]),
    "mallory": ("0", "0", "", "0", "2", "ok",
                ["freeze_backbone: incorrect: the new head is frozen",
                 "discriminative_lrs: incorrect"]),
    "other_course": ("", "", "", "0", "0", "not this course",
                     ["no cell of it is tagged exercise:<name>"]),
}


def _rows(csv_text):
    return list(csv.DictReader(io.StringIO(csv_text)))


# ------------------------------------------------ the fixture set, graded


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade every fixture once (kernels in parallel); share the result."""
    out = tmp_path_factory.mktemp("grades") / "gradebook.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grading, "KILL_GRACE", 3)
        book = grading.grade([FIXTURES], out=out, timeout=TIMEOUT,
                             memory_mb=MEMORY_MB, jobs=3, progress=False)
    return book, out


@pytest.mark.slow
def test_fixture_set_grades_into_the_expected_gradebook(graded):
    book, out = graded
    rows = _rows(out.read_text())
    assert list(rows[0]) == COLUMNS
    assert [r["student"] for r in rows] == sorted(EXPECTED)
    for row in rows:
        *points, status, phrases = EXPECTED[row["student"]]
        got = [row[c] for c in COLUMNS[2:8]]
        assert got == points + [status], (row["student"], row["message"])
        for phrase in phrases:
            assert phrase in row["message"], (row["student"], phrase)
    assert all(r.seconds > 0 for r in book.rows
               if r.status not in ("invalid notebook", "not this course"))


@pytest.mark.slow
def test_cheating_raises_no_score(graded):
    """Fake prints, stored outputs, a redefined check, a monkeypatched
    exercises module and an edited check cell all leave the points at 0."""
    book, _ = graded
    by_student = {r.student: r for r in book.rows}
    mallory = by_student["mallory"]
    assert mallory.total == 0
    assert {r.status for r in mallory.results.values()} == {"incorrect"}
    grace = by_student["grace"]
    assert grace.results["discriminative_lrs"].points == 0
    source = (FIXTURES / "mallory" / "03_fine_tuning.ipynb").read_text()
    assert "real.Exercise.grade" in source and "correct" in source


@pytest.mark.slow
def test_feedback_file_per_learner_explains_each_exercise(graded):
    book, out = graded
    folder = out.with_name("gradebook_feedback")
    names = sorted(p.stem for p in folder.glob("*.md"))
    assert names == sorted(EXPECTED)
    bob = (folder / "bob.md").read_text()
    assert "## bob/03_fine_tuning.ipynb: 1 of 2 points" in bob
    assert "### discriminative_lrs: incorrect (0/1)" in bob
    assert "Hint: " in bob
    carol = (folder / "carol.md").read_text()
    assert "cell 3 (accuracy = 1 / 0) raised ZeroDivisionError" in carol


@pytest.mark.slow
def test_rerunning_through_the_command_gives_the_same_gradebook(
        graded, tmp_path, monkeypatch, capsys):
    """Learners one by one, in reverse order, fewer jobs: same bytes."""
    _, first = graded
    monkeypatch.setattr(grading, "KILL_GRACE", 3)
    out = tmp_path / "again.csv"
    args = sorted(str(p) for p in FIXTURES.iterdir()
                  if p.suffix == ".ipynb" or p.is_dir())
    code = grading.main(args[::-1] + [
        "--out", str(out), "--timeout", str(TIMEOUT), "--memory-mb",
        str(MEMORY_MB), "--jobs", "2", "--no-progress"])
    assert code == 0
    assert out.read_text() == first.read_text()
    again = out.with_name("again_feedback")
    before = first.with_name("gradebook_feedback")
    for path in before.iterdir():
        assert (again / path.name).read_text() == path.read_text()
    assert "Gradebook" in capsys.readouterr().out


# --------------------------------------------------- finding submissions


def test_submissions_are_named_after_learners_in_a_stable_order(tmp_path):
    for rel in ("zoe/03_fine_tuning.ipynb", "adam.ipynb",
                "zoe/.ipynb_checkpoints/03_fine_tuning-checkpoint.ipynb",
                "bea/week5/05_choosing_a_strategy.ipynb"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    subs = grading.find_submissions([tmp_path])
    assert [(s.student, s.file) for s in subs] == [
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


# ---------------------------------------------------- reading notebooks


@pytest.mark.parametrize("text, phrase", [
    ('{"cells": [', "invalid JSON"),
    ('["a list"]', "no list of cells"),
    ('{"cells": [], "nbformat": 99}', "not a notebook"),
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


def test_a_notebook_expects_every_exercise_of_its_course_notebook():
    nb = _fixture("grace/03_fine_tuning.ipynb")
    assert grading._expected_exercises(nb) == ["freeze_backbone",
                                               "discriminative_lrs"]
    assert grading._expected_exercises(_fixture("other_course.ipynb")) == []
    # Tags stripped by an editor: the check calls still identify it.
    nb = _fixture("alice/03_fine_tuning.ipynb")
    for cell in nb.cells:
        cell.metadata.pop("tags", None)
    assert grading._expected_exercises(nb) == ["freeze_backbone",
                                               "discriminative_lrs"]


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


def test_recording_cells_follow_each_exercise_and_end_the_notebook(
        tmp_path):
    nb = _fixture("alice/03_fine_tuning.ipynb")
    nb.cells[1].metadata["tlhelpers_grader"] = True  # a learner's forgery
    before = len(nb.cells)
    nb = grading._instrument(nb, ["freeze_backbone", "discriminative_lrs"],
                             tmp_path / "answers", tmp_path / "heldout")
    added = [i for i, c in enumerate(nb.cells)
             if c.metadata.get("tlhelpers_grader")]
    assert len(nb.cells) == before + 3
    assert added == [5, 8, 9]
    assert "check:freeze_backbone" in nb.cells[4].metadata["tags"]
    assert str(Path(exercises.__file__).resolve()) in nb.cells[5].source
    assert "['freeze_backbone']" in nb.cells[5].source
    assert "'.final'" in nb.cells[9].source
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code")


def test_recording_cell_records_with_a_fresh_copy_of_the_checks(tmp_path):
    """Even with tlhelpers.exercises patched, the real checks record."""
    nb = _fixture("alice/03_fine_tuning.ipynb")
    nb = grading._instrument(nb, ["pick_strategy"], tmp_path,
                             tmp_path / "heldout")
    namespace = {"strategies": {"few_near": "from_scratch"}}
    original = exercises.record_answers
    try:
        exercises.record_answers = lambda *a, **k: None
        exec(nb.cells[-1].source, namespace)
    finally:
        exercises.record_answers = original
    evidence = torch.load(tmp_path / "pick_strategy.final.pt",
                          weights_only=True)
    assert not exercises.pick_strategy.grade(evidence).passed
    assert "_tlh_grader_record" not in namespace


# ------------------------------------------------- judging an outcome


def _outcome(tmp_path, report, expected=("pick_strategy",), notes=()):
    sub = grading.Submission(tmp_path / "x.ipynb", "x", "x.ipynb")
    return {"sub": sub, "expected": list(expected), "notes": list(notes),
            "status": None, "report": report, "evidence": tmp_path}


def _report(kernel="ok", cells=()):
    return {"kernel": kernel, "cells": list(cells), "recorder_errors": []}


def test_the_answer_after_the_exercise_beats_the_one_at_the_end(tmp_path):
    exercises.record_answers(["pick_strategy"], {
        "strategies": {"few_near": "feature_extraction",
                       "many_near": "full_fine_tuning",
                       "many_far": "full_fine_tuning",
                       "tight_budget": "head_only"}}, tmp_path)
    exercises.record_answers(["pick_strategy"], {"strategies": ...},
                             tmp_path, suffix=".final")
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


# ---------------------------------------------------- writing safely


def _book():
    result = exercises.Result("pick_strategy", "correct", "", 1.0, 1.0)
    row = grading.GradedNotebook("kim", "kim.ipynb", "ok",
                                 results={"pick_strategy": result},
                                 seconds=3.0)
    return grading.Gradebook(["pick_strategy"], [row])


def test_gradebook_csv_has_points_total_status_and_no_timings(tmp_path):
    out = tmp_path / "book.csv"
    written = _book().write(out)
    assert out.read_text() == (
        "student,file,pick_strategy,total,max_points,status,message\n"
        "kim,kim.ipynb,1,1,1,ok,\n")
    assert written == [tmp_path / "book_feedback" / "kim.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "book.csv", "book_feedback"]
    assert "Gradebook" in str(_book())


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
        grading.grade([tmp_path / "kim.ipynb"], out=out, progress=False)
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
    book = grading.grade([tmp_path], progress=False)
    assert [(r.student, r.status) for r in book.rows] == [
        ("a", "grader error"), ("b", "not this course")]
    assert "disk on fire" in book.rows[0].message


def test_arguments_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="timeout must be > 0"):
        grading.grade([tmp_path], timeout=0)
    with pytest.raises(ValueError, match="memory_mb must be at least"):
        grading.grade([tmp_path], memory_mb=10)


def test_threat_model_is_documented():
    doc = grading.__doc__
    assert "Threat model" in doc and "not a sandbox" in doc
    assert "container" in doc and "RLIMIT_AS" in doc


# ------------------------------------------------------------- limits


def _python(code):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", code])


def _watch(code, limit_bytes, deadline=None):
    """Run `code` under a watchdog until it acts; return (reason, alive)."""
    import time

    import psutil

    proc = _python(code)
    watchdog = grading._Watchdog(limit_bytes, interval=0.05)
    watchdog.pid, watchdog.deadline = proc.pid, deadline
    watchdog.start()
    try:
        end = time.monotonic() + 30
        while watchdog.reason is None and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.2)
        alive = (psutil.pid_exists(proc.pid)
                 and psutil.Process(proc.pid).status() != "zombie")
    finally:
        watchdog.stop()
        proc.kill()
        proc.wait()
    return watchdog.reason, alive


def test_watchdog_kills_a_kernel_past_its_memory():
    reason, alive = _watch(
        "import time\nx = bytearray(300 * 2**20)\ntime.sleep(60)",
        limit_bytes=100 * 2**20)
    assert reason == "memory" and not alive


def test_watchdog_kills_a_cell_that_ignores_its_interrupt():
    reason, alive = _watch("import time\ntime.sleep(60)",
                           limit_bytes=2**40, deadline=0.0)
    assert reason == "timeout" and not alive


@pytest.mark.skipif(not Path("/proc/self/status").exists(),
                    reason="rlimits are enforced on Linux")
def test_memory_limit_turns_a_hog_into_a_memory_error():
    import subprocess
    import sys

    code = ("from tlhelpers.grading import _limit_memory\n"
            "_limit_memory(300)\n"
            "try:\n    x = bytearray(2**30)\n"
            "except MemoryError:\n    print('MemoryError')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "MemoryError", out.stderr
