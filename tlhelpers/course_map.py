"""The course map: the core path, the extensions, and learner time.

The estimate of a learner's time follows one rule, computed from the
notebooks themselves (``estimate``):

- prose: words of markdown at ``WORDS_PER_MINUTE`` (150); the Further
  reading links are for later and are not counted;
- code: lines a learner reads and runs at ``CODE_LINES_PER_MINUTE`` (10,
  six seconds a line): not blank, not only a comment, not an import, and
  outside ``# extra code`` cells (those are run but need not be read);
- compute: the notebook's wall time in full mode, as ``tlcourse run``
  measured it (``COMPUTE_SECONDS``; refresh it from a build folder with
  ``measured_compute``), split by the cells' own timings: the time of
  extension cells counts toward the extensions, everything else (the
  kernel's start included) toward the core path;
- exercises: each exercise's own stated ``minutes``.

What is an extension, and so outside the core path:

- a whole notebook whose top cell says ``Course map: extension``;
- a section whose heading (``##`` or ``###``) says ``Extension:``, up to
  the next heading of the same or a higher level;
- a cell tagged ``extension``.

A learner on the core path skips the extensions, so no core cell may
use a name that only an extension cell defines: ``extension_dependencies``
finds any that does.

Each notebook states its learner time in its top cell, in a line that
starts ``Learner time: about N minutes``; ``stated_minutes`` reads it.
"""

import ast
import builtins
import datetime
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

WORDS_PER_MINUTE = 150
CODE_LINES_PER_MINUTE = 10
CORE_PATH_MINUTES = 90
EXTENSION_TAG = "extension"
EXTENSION_NOTEBOOK = "Course map: extension"
SCAFFOLD = "# extra code"
# Wall time of each notebook in full mode, in seconds, as `tlcourse run
# --jobs 1` reported it (fresh kernels, one notebook at a time) on a quiet
# 2-core machine with 2 threads, read with `measured_compute`: (core
# cells and the kernel's start, extension cells). On a shared machine
# times vary; the larger of two runs is kept, as a learner waits for it.
COMPUTE_SECONDS = {
    "00_welcome": (11, 0),
    "01_pretrained_models": (12, 17),
    "02_feature_extraction": (16, 7),
    "03_fine_tuning": (152, 113),
    "04_progressive_unfreezing": (269, 203),
    "05_choosing_a_strategy": (681, 147),
    "06_capstone": (0, 44),
    "07_transfer_learning_for_text": (0, 83),
    "08_appendix_running_the_course": (0, 10),
}
_HEADING = re.compile(r"^(#{2,3})\s+(.*)$")
_STATED = re.compile(r"Learner time: about (\d+) minutes")
_WORD = re.compile(r"\S+")


@dataclass
class Estimate:
    """A notebook's learner time, split into core path and extensions."""

    notebook: str
    extension: bool          # the whole notebook is an extension
    words: int               # core prose words
    code_lines: int          # core code lines
    exercises: float         # minutes of core exercises
    compute: float           # minutes of core compute (full mode)
    ext_words: int = 0
    ext_code_lines: int = 0
    ext_exercises: float = 0.0
    ext_compute: float = 0.0  # minutes of extension cells' compute

    @property
    def core_minutes(self):
        """Return the minutes this notebook adds to the core path."""
        if self.extension:
            return 0.0
        return (self.words / WORDS_PER_MINUTE
                + self.code_lines / CODE_LINES_PER_MINUTE
                + self.exercises + self.compute)

    @property
    def extension_minutes(self):
        """Return the minutes of its extensions (all of it if one)."""
        extra = (self.ext_words / WORDS_PER_MINUTE
                 + self.ext_code_lines / CODE_LINES_PER_MINUTE
                 + self.ext_exercises + self.ext_compute)
        if self.extension:
            return (extra + self.words / WORDS_PER_MINUTE
                    + self.code_lines / CODE_LINES_PER_MINUTE
                    + self.exercises + self.compute)
        return extra

    @property
    def total_minutes(self):
        """Return core and extension minutes together."""
        return self.core_minutes + self.extension_minutes

    def as_row(self):
        """Return the estimate as a table row, in whole minutes."""
        return {"notebook": self.notebook,
                "path": "extension" if self.extension else "core",
                "core min": round(self.core_minutes),
                "extension min": round(self.extension_minutes),
                "core compute min": round(self.compute, 1),
                "extension compute min": round(self.ext_compute, 1),
                "words": self.words + self.ext_words,
                "code lines": self.code_lines + self.ext_code_lines}


def _source(cell):
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def code_lines(source):
    """Count the lines of code a learner reads (no blanks, comments or
    imports)."""
    if source.lstrip().startswith(SCAFFOLD):
        return 0
    count, in_import = 0, False
    for line in source.splitlines():
        text = line.strip()
        if in_import:  # the continuation of a parenthesised import
            in_import = not text.endswith(")")
            continue
        if text.startswith(("import ", "from ")) and " import " in (
                " " + text):
            in_import = "(" in text and ")" not in text
            continue
        if text and not text.startswith("#"):
            count += 1
    return count


def words(source):
    """Count the words of a markdown cell."""
    return len(_WORD.findall(source))


def is_extension_notebook(nb):
    """True when the notebook's top cell marks it as an extension."""
    cells = nb.get("cells", [])
    return bool(cells) and EXTENSION_NOTEBOOK in _source(cells[0])


def cell_paths(nb):
    """Return, per cell, "core", "extension" or "reading" (not counted).

    "reading" is the Further reading section: links for later.
    """
    paths, marked, reading = [], None, False
    for cell in nb.get("cells", []):
        tags = cell.get("metadata", {}).get("tags", []) or []
        if cell.get("cell_type") == "markdown":
            for line in _source(cell).splitlines():
                match = _HEADING.match(line)
                if not match:
                    continue
                level, title = len(match.group(1)), match.group(2)
                if level == 2:
                    reading = title.strip().lower() == "further reading"
                if marked is not None and level <= marked:
                    marked = None
                if marked is None and "Extension:" in title:
                    marked = level
        if reading:
            paths.append("reading")
        elif marked is not None or EXTENSION_TAG in tags:
            paths.append("extension")
        else:
            paths.append("core")
    return paths


def _exercise_minutes(cell):
    from tlhelpers import exercises

    tags = cell.get("metadata", {}).get("tags", []) or []
    minutes = 0.0
    for tag in tags:
        if isinstance(tag, str) and tag.startswith(exercises.EXERCISE_TAG):
            name = tag[len(exercises.EXERCISE_TAG):].strip()
            if name in exercises.EXERCISES:
                minutes += exercises.EXERCISES[name].minutes
    return minutes


def estimate(path, compute_seconds=None):
    """Estimate a notebook's learner time by the module's rule."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    seconds = (COMPUTE_SECONDS if compute_seconds is None
               else compute_seconds).get(path.stem)
    if seconds is None:
        raise ValueError(
            f"no measured compute time for {path.stem}: run `tlcourse run "
            f"notebooks/{path.name}` and add its time to COMPUTE_SECONDS")
    core, ext = (seconds if isinstance(seconds, (tuple, list))
                 else (seconds, 0))
    est = Estimate(path.stem, is_extension_notebook(nb), 0, 0, 0.0,
                   core / 60, ext_compute=ext / 60)
    for cell, where in zip(nb["cells"], cell_paths(nb)):
        if where == "reading":
            continue
        ext = where == "extension"
        source = _source(cell)
        if cell.get("cell_type") == "markdown":
            if ext:
                est.ext_words += words(source)
            else:
                est.words += words(source)
        elif cell.get("cell_type") == "code":
            lines, minutes = code_lines(source), _exercise_minutes(cell)
            if ext:
                est.ext_code_lines += lines
                est.ext_exercises += minutes
            else:
                est.code_lines += lines
                est.exercises += minutes
    return est


def course_map(notebooks, compute_seconds=None):
    """Estimate every notebook; return the list, in course order."""
    return [estimate(p, compute_seconds) for p in sorted(notebooks)]


def core_path_minutes(estimates):
    """Return the core path's total minutes."""
    return sum(e.core_minutes for e in estimates)


def stated_minutes(path):
    """Return the learner time a notebook states at its top, or None."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    top = "".join(_source(c) for c in nb.get("cells", [])[:2])
    match = _STATED.search(top)
    return int(match.group(1)) if match else None


def stated_line(est):
    """Return the learner-time sentence a notebook should state."""
    if est.extension:
        return (f"Learner time: about {math.ceil(est.total_minutes)} "
                "minutes (an extension, after the core path).")
    extra = math.ceil(est.extension_minutes)
    more = f", and about {extra} more for the extensions" if extra else ""
    return (f"Learner time: about {math.ceil(est.core_minutes)} minutes "
            f"on the core path (reading, running, exercises){more}.")


def _timestamp(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def cell_seconds(cell):
    """Return how long an executed cell ran, from its timing metadata."""
    timing = cell.get("metadata", {}).get("execution", {})
    try:
        return max((_timestamp(timing["shell.execute_reply"])
                    - _timestamp(timing["iopub.execute_input"])
                    ).total_seconds(), 0.0)
    except (KeyError, TypeError, ValueError):
        return 0.0


def measured_compute(build_dir):
    """Read each notebook's wall time from a `tlcourse run` build.

    The executed notebooks keep each cell's timing; the time of extension
    cells is split off, and the rest (the kernel's start included) is the
    core's.

    Returns:
        {notebook stem: (core seconds, extension seconds)}.
    """
    build_dir = Path(build_dir)
    data = json.loads((build_dir / "build.json").read_text(
        encoding="utf-8"))
    measured = {}
    for record in data.get("notebooks", []):
        if record.get("status") != "passed":
            continue
        total = float(record["seconds"])
        executed = build_dir / (record.get("ipynb") or record["name"])
        ext = 0.0
        if executed.is_file():
            nb = json.loads(executed.read_text(encoding="utf-8"))
            if is_extension_notebook(nb):
                ext = total
            else:
                ext = sum(cell_seconds(cell) for cell, where in zip(
                    nb["cells"], cell_paths(nb)) if where == "extension")
        measured[Path(record["name"]).stem] = (round(total - ext),
                                               round(ext))
    return measured


def _bound_and_used(tree):
    """Return (names a cell binds, names it reads that it did not bind)."""
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                               ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound, used - bound


def _python(source):
    """The cell's source without IPython's magics and shell lines."""
    return "\n".join("" if line.lstrip().startswith(("%", "!", "?"))
                     else line for line in source.splitlines())


def extension_dependencies(nb):
    """Find core cells that use a name only an extension cell defines.

    A learner on the core path skips the extensions; such a core cell
    would fail with a NameError for them.

    Returns:
        [(cell index, name), ...]; empty when the core path stands alone.
    """
    core, extension, found = set(dir(builtins)), set(), []
    for index, (cell, where) in enumerate(zip(nb.get("cells", []),
                                              cell_paths(nb))):
        if cell.get("cell_type") != "code" or where == "reading":
            continue
        try:
            tree = ast.parse(_python(_source(cell)))
        except SyntaxError:
            continue
        bound, used = _bound_and_used(tree)
        if where == "core":
            found += [(index, name) for name in sorted(used)
                      if name in extension and name not in core]
            core |= bound
        else:
            extension |= bound
    return found


def table(notebooks, compute_seconds=None):
    """Tabulate the course map: per notebook, core and extension time."""
    from tlhelpers.display import Table

    estimates = course_map(notebooks, compute_seconds)
    rows = [e.as_row() for e in estimates]
    total = core_path_minutes(estimates)
    return Table(rows, title=f"Course map: core path about "
                 f"{math.ceil(total)} minutes (at most "
                 f"{CORE_PATH_MINUTES})")


if __name__ == "__main__":
    import glob

    print(table(sorted(glob.glob("notebooks/[0-9][0-9]_*.ipynb"))))
