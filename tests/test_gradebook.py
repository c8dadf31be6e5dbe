"""tlhelpers.gradebook: rosters, points, and the long/wide/canvas CSVs."""

import csv
import io
from pathlib import Path

import pytest

from tlhelpers import gradebook
from tlhelpers.exercises import Result
from tlhelpers.grading import Gradebook, GradedNotebook

FIXTURES = Path(__file__).parent / "fixtures" / "lms"


def _result(name, status, points=None, max_points=1.0):
    if points is None:
        points = max_points if status == "correct" else 0.0
    return Result(name, status, "", points, max_points)


def _book():
    rows = [
        GradedNotebook("alice", "03_fine_tuning.ipynb", "ok", results={
            "freeze_backbone": _result("freeze_backbone", "correct"),
            "discriminative_lrs": _result("discriminative_lrs",
                                          "incorrect")}),
        GradedNotebook("alice", "06_capstone.ipynb", "ok", results={
            "capstone": _result("capstone", "incorrect", 0.6)}),
        GradedNotebook("bob", "03_fine_tuning.ipynb", "cell errors",
                       results={
            "freeze_backbone": _result("freeze_backbone", "not attempted"),
            "discriminative_lrs": _result("discriminative_lrs",
                                          "correct")}),
        GradedNotebook("=HYPERLINK(\"x\")", "03_fine_tuning.ipynb", "ok",
                       results={"freeze_backbone": _result(
                           "freeze_backbone", "correct")}),
    ]
    return Gradebook(["freeze_backbone", "discriminative_lrs", "capstone"],
                     rows)


def _rows(text):
    return list(csv.reader(io.StringIO(text)))


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def roster(tmp_path):
    return gradebook.read_roster(_write(tmp_path, "roster.csv", (
        "id,name,email,section\n"
        "s1,Alice Liddell,alice@example.edu,A\n"
        "s2,Bob Builder,bob@example.edu,B\n"
        "s3,Carol Danvers,carol@example.edu,A\n")))


def test_long_format_keeps_one_row_per_notebook_with_checker_points():
    rows = _rows(gradebook.render(_book(), "long"))
    assert rows[0] == ["student", "file", "freeze_backbone",
                       "discriminative_lrs", "capstone", "total",
                       "max_points", "status", "message"]
    assert rows[1][:7] == ["alice", "03_fine_tuning.ipynb", "1", "0", "",
                           "1", "2"]
    # The capstone checker's partial credit counts by default.
    assert rows[2][:7] == ["alice", "06_capstone.ipynb", "", "", "0.6",
                           "0.6", "1"]


def test_formula_cells_are_neutralised():
    text = gradebook.render(_book(), "long")
    assert "\n=HYPERLINK" not in text
    assert "'=HYPERLINK" in text
    assert gradebook.safe_cell("-1.5") == "-1.5"
    assert gradebook.safe_cell("-cmd") == "'-cmd"
    assert gradebook.safe_cell("@SUM(A1)") == "'@SUM(A1)"


def test_wide_with_roster_lists_missing_learners_at_zero_and_flags_strays(
        roster):
    rows = _rows(gradebook.render(_book(), "wide", roster=roster))
    header, body = rows[0], rows[1:]
    assert header == ["id", "name", "section", "freeze_backbone",
                      "discriminative_lrs", "capstone", "total",
                      "max_points", "percent", "notes"]
    by_id = {r[0]: r for r in body}
    assert by_id["s1"][3:9] == ["1", "0", "0.6", "1.6", "3", "53.3333"]
    assert by_id["s2"][3:8] == ["0", "1", "0", "1", "3"]
    assert by_id["s3"][3:9] == ["0", "0", "0", "0", "3", "0"]
    assert by_id["s3"][9] == "no submission"
    stray = [r for r in body if r[0] == ""]
    assert len(stray) == 1 and "not on the roster" in stray[0][9]
    assert stray[0][1].startswith("'=")


def test_roster_matches_by_id_email_local_part_and_name(roster):
    matches, unmatched = gradebook.match_roster(
        roster, ["s1", "BOB", "carol danvers", "José", "Josè"])
    assert matches["s1"].id == "s1"
    assert matches["BOB"].id == "s2"
    assert matches["carol danvers"].id == "s3"
    assert unmatched == sorted(["José", "Josè"])


def test_points_file_weights_exercises_and_controls_partial_credit(
        tmp_path):
    points = gradebook.read_points(_write(tmp_path, "points.toml", (
        "[exercises]\n"
        "capstone = { points = 4, partial = true }\n"
        "freeze_backbone = 2\n")), known=["capstone", "freeze_backbone",
                                          "discriminative_lrs"])
    rows = _rows(gradebook.render(_book(), "long", points=points))
    assert rows[1][2] == "2"            # correct, worth 2
    assert rows[2][4] == "2.4"          # 0.6 of 4 points
    strict = gradebook.read_points(_write(tmp_path, "strict.toml", (
        "[exercises]\ncapstone = { points = 4, partial = false }\n")))
    rows = _rows(gradebook.render(_book(), "long", points=strict))
    assert rows[2][4] == "0"            # all or nothing


@pytest.mark.parametrize("text, message", [
    ("[exercises]\nnope = 1\n", "does not have: nope"),
    ("[exercises]\ncapstone = -1\n", ">= 0"),
    ("[exercises]\ncapstone = { points = 1, partial = 'yes' }\n",
     "true or false"),
    ("points = 1\n", r"\[exercises\] table"),
    ("[exercises\n", "cannot read"),
])
def test_bad_points_files_say_what_to_fix(tmp_path, text, message):
    with pytest.raises(gradebook.GradebookError, match=message):
        gradebook.read_points(_write(tmp_path, "p.toml", text),
                              known=["capstone"])


@pytest.mark.parametrize("text, message", [
    ("name\nAlice\n", "missing: id"),
    ("id,name\ns1,A\ns1,B\n", "already on line 2"),
    ("id,name\n,A\n", "id is empty"),
    ("id,name\n", "lists no learner"),
])
def test_bad_rosters_say_what_to_fix(tmp_path, text, message):
    with pytest.raises(gradebook.GradebookError, match=message):
        gradebook.read_roster(_write(tmp_path, "r.csv", text))


def test_canvas_format_matches_the_documented_import_columns(roster):
    sample = _rows((FIXTURES / "canvas_import_sample.csv").read_text())
    ours = _rows(gradebook.render(_book(), "canvas", roster=roster))
    fixed = len(gradebook.CANVAS_COLUMNS)
    assert ours[0][:fixed] == sample[0][:fixed]
    assert ours[1][0] == sample[1][0] == "Points Possible"
    assert ours[1][1:fixed] == sample[1][1:fixed] == [""] * (fixed - 1)
    assert ours[1][fixed:] == ["1", "1", "1"]
    assert all(len(r) == len(ours[0]) for r in ours)
    learners = {r[2]: r for r in ours[2:]}
    assert set(learners) == {"s1", "s2", "s3"}   # strays cannot be placed
    assert learners["s1"][0] == "Alice Liddell"
    assert learners["s1"][fixed:] == ["1", "0", "0.6"]


def test_unknown_format_is_refused():
    with pytest.raises(gradebook.GradebookError, match="long, wide, canvas"):
        gradebook.render(_book(), "xlsx")
