"""Gradebooks an LMS imports: rosters, points, and three CSV formats.

``tlcourse grade`` judges notebooks into rows of (learner, file, results);
this module turns those rows into what an instructor uploads:

- ``long``: one row per notebook, as graded (the default);
- ``wide``: one row per learner (id, name, points per exercise, total,
  percent); with a roster, learners with no submission are listed at 0;
- ``canvas``: the columns Canvas's gradebook import takes (Student, ID,
  SIS User ID, SIS Login ID, Section, one column per exercise) with a
  "Points Possible" row first.

Points per exercise and partial credit come from a small TOML file::

    # points.toml
    [exercises]
    capstone = { points = 4, partial = true }
    train_probe = 2           # 2 points, all or nothing
    freeze_backbone = { points = 1 }

An exercise's score is its points times the fraction the checker gave
(``partial = true``: a checker that measures partial success, such as the
capstone's accuracy between a floor and the target, earns part of the
points), or all or nothing (the default: full points only for "correct").
"""

import csv
import io
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("long", "wide", "canvas")
ROSTER_COLUMNS = ("id", "name", "email", "section")
CANVAS_COLUMNS = ("Student", "ID", "SIS User ID", "SIS Login ID",
                  "Section")
POINTS_POSSIBLE = "Points Possible"
# A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?")


class GradebookError(ValueError):
    """A roster, points file or format is wrong; the message says how."""


# ---------------------------------------------------------------- cells


def safe_cell(value):
    """Return a CSV cell a spreadsheet shows as text, never as a formula."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def number(value):
    """Return points as short text: 1, 0.5, 2.25."""
    return f"{round(value, 4):g}"


def to_csv(columns, rows):
    """Return CSV text of dict rows, every cell made formula-safe."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([safe_cell(c) for c in columns])
    for row in rows:
        writer.writerow([safe_cell(row.get(c, "")) for c in columns])
    return buffer.getvalue()


# --------------------------------------------------------------- roster


@dataclass(frozen=True)
class Learner:
    """One learner on the roster."""

    id: str
    name: str
    email: str = ""
    section: str = ""


def _key(text):
    """Return a name folded for matching: case and spacing, not accents."""
    text = unicodedata.normalize("NFC", text)
    return " ".join(text.casefold().split())


def read_roster(path):
    """Read a roster CSV (id, name, optional email and section).

    Raises GradebookError naming the line and what to fix.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise GradebookError(f"cannot read the roster {path}: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in ("id", "name") if c not in header]
    if missing:
        raise GradebookError(
            f"the roster {path} needs the columns id and name (optional: "
            f"email, section); missing: {', '.join(missing)}; found: "
            f"{', '.join(header) or 'nothing'}")
    learners, seen = [], {}
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip()
               for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue
        if not row.get("id"):
            raise GradebookError(f"{path}, line {line}: the id is empty")
        if row["id"] in seen:
            raise GradebookError(
                f"{path}, line {line}: the id {row['id']!r} is already on "
                f"line {seen[row['id']]}; every learner needs their own id")
        seen[row["id"]] = line
        learners.append(Learner(row["id"], row.get("name", ""),
                                row.get("email", ""), row.get("section", "")))
    if not learners:
        raise GradebookError(f"the roster {path} lists no learner")
    return learners


def match_roster(roster, students):
    """Map submission names to roster learners.

    A submission (a folder or notebook name) matches a learner by id,
    then email, then the email's part before the @, then name (case and
    spacing ignored, accents kept). Returns (matches, unmatched): a dict
    student -> Learner, and the sorted students that match no one.
    """
    keys = {}
    for fields in (lambda l: [l.id], lambda l: [l.email],
                   lambda l: [l.email.split("@")[0]] if l.email else [],
                   lambda l: [l.name]):
        for learner in roster:
            for value in fields(learner):
                if value:
                    keys.setdefault(_key(value), learner)
    matches, unmatched = {}, []
    for student in sorted(set(students)):
        learner = keys.get(_key(student))
        if learner is None:
            unmatched.append(student)
        else:
            matches[student] = learner
    return matches, unmatched


# --------------------------------------------------------------- points


@dataclass(frozen=True)
class Rule:
    """How many points an exercise is worth, and whether part counts."""

    points: float
    partial: bool = False


@dataclass
class Points:
    """Points per exercise; exercises not listed keep their own."""

    rules: dict = field(default_factory=dict)

    def rule(self, name, result):
        """Return the Rule for exercise `name` (default: the checker's)."""
        return self.rules.get(name, Rule(result.max_points, partial=True))

    def score(self, name, result):
        """Return (points earned, points possible) of one result."""
        rule = self.rule(name, result)
        if result.max_points <= 0:
            return 0.0, rule.points
        if rule.partial:
            fraction = min(1.0, max(0.0, result.points / result.max_points))
        else:
            fraction = 1.0 if result.status == "correct" else 0.0
        return rule.points * fraction, rule.points


def read_points(path, known=None):
    """Read a points TOML file into Points.

    Args:
        known: exercise names that exist (a name not among them is an
            error); None skips that check.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise GradebookError(f"cannot read the points file {path}: "
                             f"{err}") from err
    table = data.get("exercises")
    if not isinstance(table, dict) or not table:
        raise GradebookError(
            f"{path} needs an [exercises] table, e.g. capstone = "
            "{ points = 4, partial = true }")
    unknown = sorted(set(table) - set(known)) if known is not None else []
    if unknown:
        raise GradebookError(
            f"{path} names exercises this course does not have: "
            f"{', '.join(unknown)}; the exercises are: "
            f"{', '.join(sorted(known))}")
    rules = {}
    for name, spec in table.items():
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = {"points": spec}
        if not isinstance(spec, dict) or set(spec) - {"points", "partial"}:
            raise GradebookError(
                f"{path}: {name} must be a number of points or a table "
                f"with points and partial, got {spec!r}")
        points = spec.get("points")
        partial = spec.get("partial", False)
        if (isinstance(points, bool) or not isinstance(points, (int, float))
                or points < 0):
            raise GradebookError(f"{path}: {name}.points must be a number "
                                 f">= 0, got {points!r}")
        if not isinstance(partial, bool):
            raise GradebookError(f"{path}: {name}.partial must be true or "
                                 f"false, got {partial!r}")
        rules[name] = Rule(float(points), partial)
    return Points(rules)


# -------------------------------------------------------------- formats


def long_rows(book, points):
    """Return the long gradebook: one row per notebook, scored."""
    columns = (["student", "file"] + list(book.exercises)
               + ["total", "max_points", "status", "message"])
    rows = []
    for graded in book.rows:
        row = {"student": graded.student, "file": graded.file}
        total = possible = 0.0
        for name in book.exercises:
            result = graded.results.get(name)
            if result is None:
                row[name] = ""
                continue
            got, out_of = points.score(name, result)
            row[name] = number(got)
            total, possible = total + got, possible + out_of
        row.update(total=number(total), max_points=number(possible),
                   status=graded.status, message=graded.message)
        rows.append(row)
    return columns, rows


def _possible(book, points):
    """Return {exercise: points possible} over the graded exercises."""
    out = {}
    for graded in book.rows:
        for name, result in graded.results.items():
            out.setdefault(name, points.score(name, result)[1])
    return {name: out.get(name, points.rules[name].points
                          if name in points.rules else 1.0)
            for name in book.exercises}


def _best(book, points):
    """Return {student: {exercise: best points}} and their statuses."""
    best, statuses = {}, {}
    for graded in book.rows:
        scores = best.setdefault(graded.student, {})
        statuses.setdefault(graded.student, []).append(
            f"{graded.file}: {graded.status}")
        for name, result in graded.results.items():
            got = points.score(name, result)[0]
            scores[name] = max(scores.get(name, 0.0), got)
    return best, statuses


def wide_rows(book, points, roster=None):
    """Return the wide gradebook: one row per learner.

    With a roster, every learner on it gets a row (0 with the note "no
    submission" when nothing of theirs was graded), and submissions that
    match no one get a row with an empty id and the note "not on the
    roster". A learner's best score per exercise counts, once.
    """
    possible = _possible(book, points)
    best, statuses = _best(book, points)
    out_of = sum(possible.values())
    columns = (["id", "name", "section"] + list(book.exercises)
               + ["total", "max_points", "percent", "notes"])

    def row(ident, name, section, students, extra=()):
        scores = {}
        for student in students:
            for n, got in best[student].items():
                scores[n] = max(scores.get(n, 0.0), got)
        total = sum(scores.values())
        notes = list(extra) + [s for student in students
                               for s in statuses[student]]
        record = {"id": ident, "name": name, "section": section,
                  "total": number(total), "max_points": number(out_of),
                  "percent": number(100 * total / out_of) if out_of else "",
                  "notes": "; ".join(notes)}
        record.update({n: number(scores.get(n, 0.0))
                       for n in book.exercises})
        return record

    if roster is None:
        return columns, [row(s, s, "", [s]) for s in sorted(best)]
    matches, unmatched = match_roster(roster, best)
    rows = []
    for learner in roster:
        students = sorted(s for s, l in matches.items() if l == learner)
        extra = (["no submission"] if not students
                 else [f"submitted as {', '.join(students)}"]
                 if len(students) > 1 else [])
        rows.append(row(learner.id, learner.name, learner.section,
                        students, extra))
    rows += [row("", s, "", [s], ["not on the roster"]) for s in unmatched]
    return columns, rows


def canvas_rows(book, points, roster=None):
    """Return the Canvas import: a Points Possible row, then learners."""
    _, wide = wide_rows(book, points, roster)
    possible = _possible(book, points)
    columns = list(CANVAS_COLUMNS) + list(book.exercises)
    rows = [dict({c: "" for c in CANVAS_COLUMNS}, Student=POINTS_POSSIBLE,
                 **{n: number(possible[n]) for n in book.exercises})]
    for record in wide:
        if not record["id"]:
            continue  # not on the roster: Canvas could not place it
        learner = {"Student": record["name"], "ID": "",
                   "SIS User ID": record["id"], "SIS Login ID": "",
                   "Section": record["section"]}
        learner.update({n: record[n] for n in book.exercises})
        rows.append(learner)
    return columns, rows


def render(book, fmt="long", roster=None, points=None):
    """Return the gradebook as CSV text in format `fmt`."""
    if fmt not in FORMATS:
        raise GradebookError(f"unknown format {fmt!r}: use one of "
                             f"{', '.join(FORMATS)}")
    points = points or Points()
    if fmt == "long":
        columns, rows = long_rows(book, points)
    elif fmt == "wide":
        columns, rows = wide_rows(book, points, roster)
    else:
        columns, rows = canvas_rows(book, points, roster)
    return to_csv(columns, rows)
