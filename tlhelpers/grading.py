"""Grade submitted notebooks headlessly into a gradebook.

``tlcourse grade SUBMISSIONS... --out gradebook.csv`` (or ``grade()``):
each notebook, or each notebook found in a folder, runs in a temporary
copy, in its own kernel, with a time limit and a memory limit, several at
once. On Linux with bubblewrap (``bwrap``) each kernel runs in a sandbox:
no network, read-only system folders, only its own work folder writable,
a private /tmp and /dev/shm counted against its memory limit, its own PID
namespace (everything it started dies with it), and nothing of the
grader's in sight (command line, environment, other notebooks, held-out
labels). The kernel talks to the grader over IPC sockets in its work
folder. Without bwrap the grader refuses to run unless told
``--no-sandbox``.

The grader adds cells of its own after each exercise and at the end; they
record *evidence* of the learner's answers (see tlhelpers.exercises) from
the kernel's variables with a copy of the checks loaded afresh from the
installed files, into a file whose name the kernel learns only when the
cell runs; the worker moves it out of the kernel's reach at once. The
evidence is judged afterwards in the grading process, which never runs a
learner's code: the capstone's weights and the linear probe's features
are loaded with ``torch.load(weights_only=True)`` and scored there on
held-out images drawn from a secret seed, whose labels no kernel sees.
The gradebook (one row per notebook: points per exercise, total, status,
message) and one feedback file per learner are written atomically.

Statuses, most serious first: "invalid notebook" (not readable as a
notebook), "not this course" (no exercise of this course in it),
"grader error", "timeout", "memory limit", "kernel died", "cell errors",
"edited checks" (a check cell deleted or changed; the answers are graded
anyway), "ok". A notebook's exercises are graded whatever its status.

Threat model
------------
What the sandbox and the grader stop (tests/test_grading.py runs one
fixture notebook per case): fake printed results; redefined,
monkeypatched or edited checks and patched tlhelpers modules; evidence
files written by the notebook; working out the held-out labels (the seed
is secret, never in a kernel's reach); deleting or reading other
notebooks' files; processes that outlive the run; a forged kernel pid;
crashes, endless loops, memory hogs (also in /dev/shm), broken files.

What it does NOT stop: a learner who patches torch or Python inside
their own kernel (or races the grader's cell from a thread) can forge
the *structural* evidence of their own notebook (freezing, learning
rates, schedules, strategies). Accuracy-based scores cannot be forged
that way: they are measured here, on images whose labels the kernel never
sees. A reference solution pasted verbatim is flagged in the feedback,
not hidden. Without the sandbox (``--no-sandbox``) a learner's code runs
as the instructor, with the instructor's files and network.

Limits by operating system: on Linux the kernel gets RLIMIT_DATA =
memory_mb (the memory it can allocate) and RLIMIT_AS = memory_mb + 4 GB
(torch reserves about 3 GB of address space it never uses, so RLIMIT_AS
alone cannot be tight); on every system a watchdog also kills a kernel
whose resident memory (with its child processes, and in the sandbox what
it stored in /tmp and /dev/shm) passes memory_mb + 1 GB. macOS does not
enforce these rlimits and Windows has none, so there the watchdog alone
limits memory. Time limits work everywhere.
"""

import argparse
import csv
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tlhelpers import cluster, files, gradebook, kernels
from tlhelpers.display import Table

# tlhelpers.exercises (and torch with it), nbformat and nbclient are
# imported inside the functions that need them: `tlcourse grade --help`
# answers at once, and the worker process never imports torch.

DEFAULT_MEMORY_MB = 3072     # per kernel
# The capstone's reference solution (ImageNet weights, two training
# phases) fails at 1024 MB of RLIMIT_DATA and passes from 1280 MB
# (benchmarks/bench_grading.py --memory); below the minimum, honest work
# fails in ways that look like the learner's fault.
MIN_MEMORY_MB = 2048
COLLECT_TIMEOUT = 120        # seconds for each cell the grader adds
KILL_GRACE = 10              # seconds a cell gets to obey an interrupt
AS_ALLOWANCE_MB = 4096       # address space torch reserves but never uses
WATCHDOG_SLACK_MB = 1024     # resident libraries on top of memory_mb
MAX_EVIDENCE_MB = 1024       # larger evidence files are not loaded
# A gradebook row's status: the most serious condition, first here.
NOTEBOOK_STATUSES = ("invalid notebook", "not this course",
                     "grader error", "timeout", "memory limit",
                     "kernel died", "cell errors", "edited checks", "ok")
# Exit codes of `tlcourse grade` (its --help lists them).
EXIT_OK, EXIT_WRITE, EXIT_USAGE, EXIT_NO_SANDBOX = 0, 1, 2, 3
EXIT_UNGRADED, EXIT_CLUSTER, EXIT_INTERRUPTED = 4, 5, 130
SKIPPED_FOLDERS = (".ipynb_checkpoints",)
_COURSE_NOTEBOOK = re.compile(r"^\d\d_")
_CHECK_CALL = re.compile(r"exercises\.([a-z_]+)\.check\(")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
NO_SANDBOX_HELP = (
    "install bubblewrap (Debian/Ubuntu: sudo apt-get install bubblewrap; "
    "Fedora: sudo dnf install bubblewrap), or grade inside the container "
    "the README shows; only for a cohort you trust, pass --no-sandbox "
    "(learners' code then runs as you, with your files and network)")
# Files of /etc the kernel reads (libraries, time zone, users, fonts,
# certificates); the rest of /etc stays out of the sandbox.
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
        "/etc/localtime", "/etc/passwd", "/etc/group",
        "/etc/nsswitch.conf", "/etc/hosts", "/etc/fonts", "/etc/ssl",
        "/etc/ca-certificates", "/etc/alternatives", "/etc/mime.types",
        "/etc/matplotlibrc")
# Grader variables a kernel keeps (locale, library paths, course mode).
_PASS_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "LD_LIBRARY_PATH", "TLH_SMOKE",
             "TLH_OFFLINE")


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot sandbox kernels on this machine."""


def default_jobs(memory_mb=DEFAULT_MEMORY_MB):
    """Return how many notebooks to run at once (cores, memory, 4 at most)."""
    return kernels.default_jobs(memory_mb)


def sandbox_problem():
    """Return why kernels cannot be sandboxed here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "the sandbox (bubblewrap) needs Linux"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        # The flags the kernels get, so a bwrap too old or too limited
        # for them is found here, not in every notebook.
        probe = subprocess.run(
            [bwrap, "--unshare-all", "--die-with-parent", "--new-session",
             "--cap-drop", "ALL", "--clearenv", "--ro-bind", "/", "/",
             "--proc", "/proc", "--dev", "/dev", "--size", str(2**20),
             "--tmpfs", "/tmp", "true"],
            capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap does not run ({err})"
    if probe.returncode != 0:
        why = " ".join(probe.stderr.split())[:200] or "no message"
        return f"bwrap cannot create a sandbox here ({why})"
    return None


# ----------------------------------------------------------- submissions


@dataclass(frozen=True)
class Submission:
    """One notebook to grade: where it is and whose it is.

    ``problem`` set means the file is not run: its row says why.
    """

    path: Path
    student: str
    file: str
    problem: str = ""


def find_submissions(paths, skipped=None):
    """Expand notebooks and folders into submissions, in a stable order.

    A notebook in a sub-folder belongs to the learner that sub-folder is
    named after (``alice/03_fine_tuning.ipynb``). A notebook on its own is
    named after its learner (``alice.ipynb``), unless its name is a course
    notebook's (``NN_...``): then its folder names the learner, and the
    file reads ``alice/03_fine_tuning.ipynb`` however it was given.
    Editors' checkpoint folders and links to folders are not searched:
    each is appended to ``skipped`` as (path, reason). A linked notebook
    gets a row that says it was not followed.
    """
    skipped = [] if skipped is None else skipped
    found = {}
    for arg in paths:
        root = Path(arg)
        if root.is_dir() and not root.is_symlink():
            for path in _walk(root, skipped):
                rel = path.relative_to(root)
                if len(rel.parts) > 1:
                    entry = (path, rel.parts[0], rel.as_posix())
                else:
                    entry = _alone(path)
                found.setdefault(os.path.abspath(path), entry)
        elif root.is_file() or root.is_symlink():
            found.setdefault(os.path.abspath(root), _alone(root))
        elif root.is_dir():
            skipped.append((root, "a link to a folder (links are not "
                                  "followed)"))
        else:
            raise FileNotFoundError(f"no notebook or folder at {arg!r}")
    names = [(s, f) for _, s, f in found.values()]
    subs = []
    for path, student, file in found.values():
        problem = ""
        if path.is_symlink():
            problem = ("a symbolic link, not a notebook: links are not "
                       "followed; submit the notebook itself")
        subs.append(Submission(path, student,
                               file if names.count((student, file)) == 1
                               else str(path), problem))
    if not subs:
        raise ValueError(f"no notebooks (.ipynb) found in "
                         f"{', '.join(map(str, paths)) or 'nothing'}: pass "
                         "notebooks or folders of notebooks")
    return sorted(subs, key=lambda s: (s.student, s.file))


def _walk(root, skipped):
    """Yield the notebooks under a folder; note what is not searched."""
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in sorted(dirs):
            path = Path(folder) / name
            if name in SKIPPED_FOLDERS:
                skipped.append((path, "an editor's checkpoint copies"))
                dirs.remove(name)
            elif path.is_symlink():
                skipped.append((path, "a link to a folder (links are "
                                      "not followed)"))
        dirs.sort()
        for name in sorted(names):
            if name.endswith(".ipynb"):
                yield Path(folder) / name


def _alone(path):
    """Return (path, learner, file) of a notebook not in a learner folder."""
    folder = Path(os.path.abspath(path)).parent.name
    if _COURSE_NOTEBOOK.match(path.stem) and folder:
        return path, folder, f"{folder}/{path.name}"
    return path, path.stem, path.name


# -------------------------------------------------------------- results


@dataclass
class GradedNotebook:
    """One gradebook row: a notebook's results, status and notes."""

    student: str
    file: str
    status: str
    notes: list = field(default_factory=list)
    results: dict = field(default_factory=dict)   # name -> Result
    seconds: float = 0.0

    @property
    def total(self):
        """Return the points earned."""
        return sum(r.points for r in self.results.values())

    @property
    def max_points(self):
        """Return the points available."""
        return sum(r.max_points for r in self.results.values())

    @property
    def message(self):
        """Return the notes and every exercise not solved, in one line."""
        parts = list(self.notes) + [str(r) for r in self.results.values()
                                    if not r.passed]
        return "; ".join(parts)


@dataclass
class Gradebook:
    """Graded notebooks, one row each, sorted by learner and file.

    ``seed`` says whether the held-out seed was "drawn" (secret, new each
    run) or "given" (--seed); the seed itself is never written.
    """

    exercises: list
    rows: list
    seed: str = ""
    skipped: list = field(default_factory=list)

    @property
    def columns(self):
        """Return the CSV columns."""
        return (["student", "file"] + list(self.exercises)
                + ["total", "max_points", "status", "message", "seed"])

    def records(self):
        """Return the rows as dicts of CSV values (timings left out)."""
        out = []
        for row in self.rows:
            record = {"student": row.student, "file": row.file}
            for name in self.exercises:
                result = row.results.get(name)
                record[name] = "" if result is None else _num(result.points)
            record.update(total=_num(row.total),
                          max_points=_num(row.max_points),
                          status=row.status, message=row.message,
                          seed=self.seed)
            out.append(record)
        return out

    def to_csv(self):
        """Return the gradebook as CSV text, formulas neutralised."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns,
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _inert(v) for k, v in r.items()}
                         for r in self.records())
        return buffer.getvalue()

    def feedback_files(self):
        """Return {learner: feedback file name}, one file per learner."""
        students = sorted({row.student for row in self.rows})
        names = {s: feedback_name(s) for s in students}
        if len(set(names.values())) < len(names):  # a hash collision
            names = {s: feedback_name(s, digits=64) for s in students}
        return names

    def write(self, path, feedback_dir=None, text=None):
        """Write the CSV (atomically) and one feedback file per learner.

        Args:
            text: the gradebook text to write (another format, see
                tlhelpers.gradebook); None writes to_csv().

        Returns:
            the feedback files written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if feedback_dir is None:
            feedback_dir = path.with_name(path.stem + "_feedback")
        feedback_dir = Path(feedback_dir)
        feedback_dir.mkdir(parents=True, exist_ok=True)
        written = []
        names = self.feedback_files()
        for student, feedback in self.feedback().items():
            target = feedback_dir / names[student]
            files.write_text(target, feedback)
            written.append(target)
        # The gradebook last: it never points at feedback not yet written.
        files.write_text(path, self.to_csv() if text is None else text)
        return written

    def feedback(self):
        """Return {learner: markdown feedback on all their notebooks}."""
        from tlhelpers import exercises

        texts = {}
        for row in self.rows:
            lines = texts.setdefault(row.student, [
                f"# Feedback for {row.student}", ""])
            lines += [f"## {row.file}: {_num(row.total)} of "
                      f"{_num(row.max_points)} points", "",
                      f"Status: {row.status}", ""]
            if row.notes:
                lines += ["Running your notebook:", ""]
                lines += [f"- {note}" for note in row.notes] + [""]
            for name, result in row.results.items():
                lines += [f"### {name}: {result.status} "
                          f"({_num(result.points)}/"
                          f"{_num(result.max_points)})", ""]
                if result.message:
                    lines += [result.message, ""]
                if result.status != "correct":
                    lines += [f"Hint: {exercises.get(name).hint_text}", ""]
        return {s: "\n".join(lines).rstrip() + "\n"
                for s, lines in texts.items()}

    def table(self):
        """Return the gradebook as a Table (for notebooks and terminals)."""
        rows = [dict(r, message=_shorten(r["message"], 60))
                for r in self.records()]
        return Table(rows, columns=self.columns, title="Gradebook")

    def __str__(self):
        return str(self.table())

    def _repr_html_(self):
        return self.table()._repr_html_()


def feedback_name(student, digits=10):
    """Return a learner's feedback file name: readable slug plus hash.

    The hash is of the exact name, so "José" and "Josè" (both "Jose")
    never share a file.
    """
    ascii_name = unicodedata.normalize("NFKD", student).encode(
        "ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_name).strip("._-")[:40]
    digest = hashlib.sha256(student.encode("utf-8", "surrogatepass"))
    return f"{slug or 'learner'}-{digest.hexdigest()[:digits]}.md"


def _inert(value):
    """Keep a spreadsheet from reading a CSV cell as a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        try:
            float(value)
            return value  # a number, not a formula
        except ValueError:
            return "'" + value
    return value


def _num(value):
    return f"{value:g}"


def _shorten(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


def _clean(text, run_dir, limit=300):
    """Make a kernel's message short, one line and free of run details."""
    text = str(text).replace(str(run_dir), "<grading folder>")
    text = _ADDRESS.sub("0x...", " ".join(text.split()))
    return _shorten(text, limit)


# ------------------------------------------------------------ preparing


def _read_notebook(path):
    """Return (notebook dict, None) or (None, why it is not a notebook)."""
    import nbformat

    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = json.loads(text)
    except UnicodeDecodeError:
        return None, "not a notebook: the file is not UTF-8 text"
    except ValueError as err:
        return None, f"not a notebook: invalid JSON ({err})"
    except OSError as err:
        return None, f"cannot read the file ({err.strerror})"
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        return None, "not a notebook: the JSON has no list of cells"
    for number, cell in enumerate(raw["cells"], 1):
        problem = _cell_problem(cell)
        if problem:
            return None, f"not a notebook: cell {number} {problem}"
    try:
        with warnings.catch_warnings():
            # Missing cell ids and the like: nbformat fixes them itself.
            warnings.simplefilter("ignore")
            nb = nbformat.reads(text, as_version=4)
    except Exception as err:
        return None, f"not a notebook: {_shorten(str(err), 200)}"
    return nb, None


def _cell_problem(cell):
    """Say what makes a cell unreadable, or return ""."""
    if not isinstance(cell, dict):
        return "is not a JSON object"
    if cell.get("cell_type") not in ("code", "markdown", "raw"):
        return f"has an unknown type {cell.get('cell_type')!r}"
    source = cell.get("source", "")
    if not (isinstance(source, str) or (isinstance(source, list) and all(
            isinstance(line, str) for line in source))):
        return "has a source that is not text"
    if not isinstance(cell.get("metadata", {}), dict):
        return "has metadata that is not a JSON object"
    tags = cell.get("metadata", {}).get("tags", [])
    if not isinstance(tags, list):
        return "has tags that are not a list"
    return ""


def _language(nb):
    """Return the notebook's language and a remark on bad metadata."""
    remarks = []
    meta = nb.metadata
    spec, info = meta.get("kernelspec"), meta.get("language_info")
    for key, value in (("kernelspec", spec), ("language_info", info)):
        if value is not None and not isinstance(value, dict):
            remarks.append(f"the notebook's {key} metadata is not valid "
                           "(ignored)")
            meta.pop(key)
    spec = spec if isinstance(spec, dict) else {}
    info = info if isinstance(info, dict) else {}
    return str(spec.get("language") or info.get("name") or "python"), \
        remarks


def _expected_exercises(nb):
    """Return the course exercises a submitted notebook should answer."""
    from tlhelpers import exercises

    named = set(exercises.exercise_cells(nb))
    for cell in nb.cells:
        if cell.cell_type == "code":
            named.update(_CHECK_CALL.findall(exercises.cell_source(cell)))
    notebooks = {exercises.EXERCISES[n].notebook for n in named
                 if n in exercises.EXERCISES}
    return [e.name for e in exercises.EXERCISES.values()
            if e.notebook in notebooks]


def _convention_notes(nb, expected):
    """Say which check or answer cells were deleted or edited."""
    from tlhelpers import exercises

    cells = exercises.exercise_cells(nb)
    notes = []
    for name in expected:
        where = cells.get(name, {"exercise": [], "check": []})
        wanted = exercises.normalise_code(exercises.get(name).check_source)
        if not where["check"]:
            notes.append(f"the check cell of {name} was deleted (graded "
                         "from your answer anyway)")
        elif any(exercises.normalise_code(exercises.cell_source(
                nb.cells[i])) != wanted for i in where["check"]):
            notes.append(f"the check cell of {name} was edited (graded "
                         "from your answer anyway)")
        if not where["exercise"]:
            notes.append(f"the answer cell of {name} is missing its "
                         f"exercise:{name} tag or was deleted")
    return notes


def _remarks(nb, expected, file_stem):
    """Note pasted reference solutions and exercises out of place."""
    from tlhelpers import exercises

    cells = exercises.exercise_cells(nb)
    homes = {e.notebook for e in exercises.EXERCISES.values()}
    remarks = []
    for name in expected:
        exercise = exercises.get(name)
        solution = exercises.normalise_code(exercise.solution_code)
        if any(exercises.normalise_code(exercises.cell_source(
                nb.cells[i])) == solution
               for i in cells.get(name, {}).get("exercise", [])):
            remarks.append(f"the answer to {name} is the reference "
                           "solution, pasted verbatim")
        if file_stem in homes and exercise.notebook != file_stem:
            remarks.append(f"{name} belongs in {exercise.notebook}, not "
                           f"{file_stem} (graded here, counted once)")
    return remarks


_RECORDER = '''\
# Added by the grader: records the answers to {shown}.
def _tlh_grader_record():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_tlh_grader", {module!r})
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    fresh.record_answers({names!r}, globals(), {outbox!r}, {token!r},
                         {heldout!r})
_tlh_grader_record()
del _tlh_grader_record
'''


def _instrument(nb, expected, outbox, heldout_dir):
    """Add the grader's recording cells: after each exercise, at the end.

    Each cell writes to names with a fresh random token that the kernel
    sees only when the cell runs; the token lives in the cell's metadata,
    which stays with the grader.
    """
    import nbformat

    from tlhelpers import exercises

    def recorder(names, suffix):
        token = secrets.token_hex(16)
        cell = nbformat.v4.new_code_cell(_RECORDER.format(
            shown=", ".join(names), module=str(Path(__file__).resolve()),
            names=list(names), outbox=str(outbox), token=token,
            heldout=str(heldout_dir)))
        cell.metadata["tlhelpers_grader"] = {
            "names": list(names), "suffix": suffix, "token": token}
        return cell

    after = {}
    for name, where in exercises.exercise_cells(nb).items():
        if name in expected and (where["exercise"] or where["check"]):
            last = max(where["exercise"] + where["check"])
            after.setdefault(last, []).append(name)
    cells = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("tlhelpers_grader", None)
        cells.append(cell)
        if index in after:
            cells.append(recorder(after[index], ""))
    cells.append(recorder(expected, ".final"))
    nb.cells = cells
    return nb


# ------------------------------------------------------ the kernel side


def record_answers(names, namespace, outbox, token, heldout=None):
    """Save each exercise's evidence from a notebook's variables.

    Runs inside the learner's kernel, in the grader's cell, from a fresh
    copy of this file, with a fresh copy of the checks. Writes
    ``<outbox>/<token>-<name>.pt``; an answer that fails when read
    (even with SystemExit) is recorded as that failure. Missing held-out
    images raise: that is the grader's fault, not the learner's.
    """
    import torch

    fresh = _fresh_exercises()
    for name in names:
        exercise = fresh.get(name)
        images = None
        if exercise.task_spec is not None:
            try:
                images = fresh.to_pil(torch.load(
                    Path(heldout) / f"{name}.pt", weights_only=True))
            except Exception as err:
                raise RuntimeError(
                    f"the grader's held-out images for {name} are missing"
                    f" or unreadable ({type(err).__name__})") from None
        try:
            evidence = exercise.collect(namespace, images)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit from a learner's object
            evidence = exercise._evidence(error=(
                f"reading your answer raised {type(err).__name__}: {err}"))
        buffer = io.BytesIO()
        try:
            torch.save(evidence, buffer)
        except Exception as err:
            buffer = io.BytesIO()
            torch.save(exercise._evidence(error=(
                f"your answer could not be recorded ({err})")), buffer)
        with open(Path(outbox) / f"{token}-{name}.pt", "wb") as out:
            out.write(buffer.getvalue())


def _fresh_exercises():
    """Load tlhelpers.exercises afresh from its file, with fresh imports.

    The kernel's own tlhelpers modules (maybe patched) are set aside while
    it loads, so its config, files and other top-level imports are fresh
    copies too; they are put back afterwards.
    """
    import importlib.util
    import types

    package = Path(__file__).resolve().parent
    saved = {k: v for k, v in sys.modules.items()
             if k == "tlhelpers" or k.startswith("tlhelpers.")}
    try:
        for key in saved:
            del sys.modules[key]
        fresh_package = types.ModuleType("tlhelpers")
        fresh_package.__path__ = [str(package)]
        sys.modules["tlhelpers"] = fresh_package
        spec = importlib.util.spec_from_file_location(
            "_tlh_grader_exercises", package / "exercises.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for key in [k for k in sys.modules
                    if k == "tlhelpers" or k.startswith("tlhelpers.")]:
            del sys.modules[key]
        sys.modules.update(saved)


# ------------------------------------------------------ the worker side


def _tmpfs_bytes(pid):
    """Return what a sandbox stored in its /tmp and /dev/shm, in bytes."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            used = 0
            for folder in ("tmp", "dev/shm"):
                info = os.statvfs(f"/proc/{proc.pid}/root/{folder}")
                used += (info.f_blocks - info.f_bfree) * info.f_frsize
            return used
        except OSError:
            continue
    return 0


def _sandbox_argv(spec):
    """Return the bwrap command line that wraps a grading kernel."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv"]
    for key, value in sorted(spec["env"].items()):
        argv += ["--setenv", key, value]
    size = str(int(spec["memory_mb"]) * 2**20)
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", size, "--tmpfs", "/tmp",
             "--size", size, "--tmpfs", "/dev/shm",
             "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in _ETC + tuple(spec["read_only"]):
        if os.path.exists(path):
            argv += ["--ro-bind", path, path]
    for path in spec["writable"]:
        argv += ["--bind", path, path]
    return argv + ["--chdir", spec["cwd"], "--"]


def _read_only_paths():
    """Return what a sandboxed kernel reads: Python, packages, weights."""
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix,
             str(Path(__file__).resolve().parent)}
    paths.update(sysconfig.get_paths().values())
    paths.update(site.getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        paths.add(user_site)
    paths.add(_torch_home())
    existing = sorted(p for p in paths if p and os.path.isdir(p)
                      and not p.startswith(("/usr", "/proc", "/dev")))
    # Outer folders first, so an inner bind is not hidden by an outer one.
    return sorted(existing, key=lambda p: p.count(os.sep))


def _torch_home():
    """Return where torch keeps downloaded weights for this user."""
    return os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "torch")


def _collect_evidence(cell, outbox, evidence):
    """Move a recording cell's files out of the kernel's reach.

    Returns the exercises whose file is missing.
    """
    info = cell.metadata["tlhelpers_grader"]
    missing = []
    for name in info["names"]:
        source = Path(outbox) / f"{info['token']}-{name}.pt"
        try:
            if not stat.S_ISREG(os.lstat(source).st_mode):
                raise OSError("not a regular file")
            shutil.move(str(source), str(Path(evidence)
                                         / f"{name}{info['suffix']}.pt"))
        except OSError:
            missing.append(name)
    return missing


def _execute(spec):
    """Run one instrumented notebook; write what happened as JSON.

    Runs in a worker process, one per notebook: the kernel it starts
    inherits its memory limits, and nothing the kernel starts outlives it.
    """
    import nbformat

    kernels.adopt_orphans()
    kernels.limit_memory(spec["memory_mb"], AS_ALLOWANCE_MB)
    nb = nbformat.read(spec["notebook"], as_version=4)
    watchdog = kernels.Watchdog(
        (spec["memory_mb"] + WATCHDOG_SLACK_MB) * 2**20,
        grace=spec["kill_grace"],
        extra=_tmpfs_bytes if spec["sandbox"] else None)
    report = {"kernel": "ok", "cells": [], "recorder_errors": [],
              "skipped": 0}

    def collect(cell, index, timed_out):
        if not _is_grader(cell):
            return
        errors = [o for o in cell.get("outputs", [])
                  if o.get("output_type") == "error"]
        missing = _collect_evidence(cell, spec["outbox"], spec["evidence"])
        if missing and not errors and not timed_out:
            report["recorder_errors"].append({
                "ename": "", "evalue": "the recording cell ran but "
                f"wrote nothing for {', '.join(missing)}"})

    km = kernels.kernel_manager(
        wrapper=_sandbox_argv(spec) if spec["sandbox"] else (),
        ipc_folder=spec["ipc"] if spec["sandbox"] else None, encrypt=False)
    try:
        run = kernels.run_notebook(
            nb, km, spec["env"], spec["cwd"], timeout=spec["timeout"],
            allow_errors=True, interrupt_on_timeout=True, memory=watchdog,
            extra=_is_grader, extra_timeout=spec["collect_timeout"],
            on_executed=collect,
            record_timing=False, shutdown="immediate")
    finally:
        kernels.kill_children()  # whatever the kernel left behind
    if run.error is not None:
        report["kernel"] = _kernel_end(run.error, watchdog.reason)
    if (watchdog.reason == "timeout" and 0 <= run.index < len(nb.cells)
            and not _is_grader(nb.cells[run.index])):
        # Killed at its deadline: the cell running then ran past the
        # limit too, though the kernel never answered its interrupt (a
        # late interrupt can also stop the kernel's own loop).
        run.timed_out.add(run.index)
    report["skipped"] = len(run.skipped)
    number = 0
    for index, cell in enumerate(nb.cells):
        grader = _is_grader(cell)
        number += not grader
        errors = [out for out in cell.get("outputs", [])
                  if out.get("output_type") == "error"]
        if index in run.timed_out and not errors:
            errors = [{}]  # interrupted inside C code: no traceback
        for out in errors:
            entry = {"cell": number,
                     "first_line": kernels.first_line(cell.source),
                     "ename": out.get("ename", ""),
                     "evalue": out.get("evalue", ""),
                     "timed_out": index in run.timed_out}
            report["recorder_errors" if grader else "cells"].append(entry)
    Path(spec["report"]).write_text(json.dumps(report))


def _is_grader(cell):
    """Return True for a cell the grader added (it records answers)."""
    return bool(cell.metadata.get("tlhelpers_grader"))


def _kernel_end(err, reason):
    """Say how the kernel ended, from nbclient's error and the watchdog."""
    from nbclient.exceptions import DeadKernelError

    if reason is not None:
        return {"memory": "killed for memory",
                "timeout": "killed at time limit"}[reason]
    if isinstance(err, DeadKernelError):
        return "died"
    return f"failed: {type(err).__name__}: {err}"


# ------------------------------------------------------ the parent side


def _with_package_path(env):
    """Let a child process import this tlhelpers, installed or not."""
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def _kernel_env(work, threads, sandbox):
    """Return the whole environment of a grading kernel (no grader's)."""
    python_bin = str(Path(sys.executable).parent)
    env = {key: os.environ[key] for key in _PASS_ENV if key in os.environ}
    env.update(
        PATH=os.pathsep.join((python_bin, "/usr/local/bin", "/usr/bin",
                              "/bin")),
        HOME=str(work / "home"), TLH_CACHE_DIR=str(work / "cache"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        MPLBACKEND="Agg", MPLCONFIGDIR=str(work / "home" / ".matplotlib"),
        TQDM_DISABLE="1", TLH_PROGRESS="0", PYTHONHASHSEED="0",
        TLH_LIVE="text",
        PYDEVD_DISABLE_FILE_VALIDATION="1")
    # Threads, OpenMP waiting and the allocator, as every course kernel.
    env.update(kernels.runtime_env(threads))
    env.setdefault("LANG", "C.UTF-8")
    # HOME is the notebook's own: point torch at the instructor's cache
    # (read-only in the sandbox) so downloaded backbones still load.
    env["TORCH_HOME"] = _torch_home()
    if sandbox:
        env["TLH_OFFLINE"] = "1"  # no network in there: do not wait for it
    return env


def _run_worker(spec_path, work, hard_timeout, running, lock,
                die_with_parent=False):
    """Start a worker for one notebook and wait; kill it past the limit.

    The worker's pid and start time stay in this process's memory.
    ``die_with_parent`` (on a Dask worker, which may be killed outright):
    the worker process, and with it its kernel, dies with this process.
    """
    with open(work / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tlhelpers.grading", "--worker",
             str(spec_path)],
            cwd=work, stdout=log, stderr=subprocess.STDOUT,
            env=_with_package_path(dict(os.environ)),
            start_new_session=True,
            preexec_fn=(kernels.die_with_parent if die_with_parent
                        and sys.platform.startswith("linux") else None))
        handle = (proc.pid, kernels.start_time(proc.pid))
        with lock:
            running.add(handle)
        try:
            proc.wait(timeout=hard_timeout)
            killed = False
        except subprocess.TimeoutExpired:
            kernels.kill_tree(*handle)
            proc.wait()
            killed = True
        finally:
            with lock:
                running.discard(handle)
    return killed


def _execute_submission(sub, index, settings, running, lock):
    """Prepare, run and record one submission; return its raw outcome."""
    import nbformat

    start = time.monotonic()
    outcome = {"sub": sub, "expected": [], "notes": [], "remarks": [],
               "status": None, "report": None, "evidence": None}
    if sub.problem:
        outcome.update(status="invalid notebook", notes=[sub.problem])
        return outcome, time.monotonic() - start
    nb, problem = _read_notebook(sub.path)
    if problem:
        outcome.update(status="invalid notebook", notes=[problem])
        return outcome, time.monotonic() - start
    language, remarks = _language(nb)
    expected = _expected_exercises(nb)
    if not expected or language.lower() != "python":
        why = ("no cell of it is tagged exercise:<name> or check:<name> "
               "with an exercise of this course" if not expected
               else f"it is a {language} notebook")
        outcome.update(status="not this course", notes=[why])
        return outcome, time.monotonic() - start
    outcome["expected"] = expected
    outcome["notes"] = _convention_notes(nb, expected)
    outcome["remarks"] = remarks + _remarks(nb, expected,
                                            Path(sub.file).stem)
    work = settings["run_dir"] / f"{index:04d}"
    folders = {name: work / name for name in (
        "notebook", "home", "cache", "ipc", "outbox", "evidence",
        "heldout")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    outcome["evidence"] = folders["evidence"]
    for name in expected:  # each notebook its own copy
        if settings["heldout"].get(name) is not None:
            shutil.copy(settings["heldout"].file(name),
                        folders["heldout"] / f"{name}.pt")
    nb = _instrument(nb, expected, folders["outbox"], folders["heldout"])
    notebook = work / "submission.ipynb"   # outside the sandbox
    nbformat.write(nb, str(notebook))
    sandbox = settings["sandbox"]
    spec = {"notebook": str(notebook), "cwd": str(folders["notebook"]),
            "timeout": settings["timeout"],
            "collect_timeout": COLLECT_TIMEOUT,
            "kill_grace": KILL_GRACE, "memory_mb": settings["memory_mb"],
            "report": str(work / "report.json"), "sandbox": sandbox,
            "env": _kernel_env(work, settings["threads"], sandbox),
            "ipc": str(folders["ipc"]), "outbox": str(folders["outbox"]),
            "evidence": str(folders["evidence"]),
            "read_only": settings["read_only"] + [str(folders["heldout"])],
            "writable": [str(folders[n]) for n in (
                "notebook", "home", "cache", "ipc", "outbox")]}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    hard = notebook_limit(settings["timeout"], len(expected))
    killed = _run_worker(spec_path, work, hard, running, lock,
                         settings.get("die_with_parent", False))
    try:
        outcome["report"] = json.loads((work / "report.json").read_text())
    except (OSError, ValueError):
        log = (work / "worker.log").read_text(errors="replace")
        last = log.strip().splitlines()[-1:] or ["no output"]
        outcome["report"] = {"kernel": "killed at time limit" if killed
                             else f"failed: the grader's worker stopped "
                                  f"({last[0]})",
                             "cells": [], "recorder_errors": [],
                             "skipped": 0}
    return outcome, time.monotonic() - start


def _load_evidence(path, name):
    import torch

    try:
        if (not stat.S_ISREG(os.lstat(path).st_mode)
                or os.lstat(path).st_size > MAX_EVIDENCE_MB * 2**20):
            return None
        evidence = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(evidence, dict) or evidence.get("exercise") != name:
        return None
    return evidence


def _pick_evidence(after_answer, at_end):
    """Prefer a usable answer right after the exercise, then at the end."""
    def rank(ev):
        if ev is None:
            return 0
        if not ev.get("attempted"):
            return 1
        return 2 if ev.get("error") else 3

    return max((after_answer, at_end), key=rank)  # ties keep the first


def _cell_condition(cell, where, error, memory_mb):
    """Return (status, note) for one failed cell of the learner's."""
    if cell["timed_out"]:
        return "timeout", (f"{where} ran past the time limit and was "
                           "interrupted")
    if ("MemoryError" in cell["ename"]
            or "can't allocate memory" in cell["evalue"]):
        return "memory limit", (f"{where} ran out of memory ({memory_mb} "
                                f"MB allowed): {error}")
    if "No space left on device" in cell["evalue"]:
        return "memory limit", (
            f"{where} filled /tmp or /dev/shm, which count against the "
            f"memory limit ({memory_mb} MB): {error}")
    return "cell errors", f"{where} raised {error}"


def _judge(outcome, heldout, run_dir, memory_mb, timeout=None):
    """Turn a submission's outcome into a gradebook row.

    Args:
        heldout: {exercise: (PIL images, labels)} the grader drew.
    """
    from tlhelpers import exercises

    sub = outcome["sub"]
    row = GradedNotebook(sub.student, sub.file, outcome["status"] or "ok",
                         notes=[_clean(n, run_dir) for n in outcome["notes"]])
    if outcome["status"]:
        return row
    # The notes so far say which exercise cells were deleted or edited.
    conditions = {"edited checks"} if outcome["notes"] else set()
    row.notes += [_clean(n, run_dir) for n in outcome.get("remarks", [])]
    report = outcome["report"]
    for cell in report["cells"]:
        where = f"cell {cell['cell']}"
        if cell["first_line"]:
            where += f" ({_clean(cell['first_line'], run_dir, 60)})"
        error = _clean(": ".join(t for t in (cell["ename"], cell["evalue"])
                                 if t), run_dir)
        status, note = _cell_condition(cell, where, error, memory_mb)
        conditions.add(status)
        row.notes.append(note)
    if report.get("skipped"):
        conditions.add("timeout")
        row.notes.append(f"{report['skipped']} cell(s) did not run: the "
                         f"time limit ({_num(timeout or 0)} s for all "
                         "cells) was spent")
    kernel = report["kernel"]
    if kernel == "killed at time limit":
        conditions.add("timeout")
        row.notes.append("the notebook was stopped at the time limit (a "
                         "cell did not obey the interrupt); the cells "
                         "after it did not run")
    elif kernel == "killed for memory":
        conditions.add("memory limit")
        row.notes.append(f"the kernel was stopped for using more than "
                         f"{memory_mb} MB; the cells after it did not run")
    elif kernel == "died":
        conditions.add("kernel died")
        row.notes.append("the kernel died (a crash, exit() or a killed "
                         "process); the cells after it did not run")
    elif kernel != "ok":
        conditions.add("grader error")
        row.notes.append(_clean(kernel, run_dir))
    for cell in report["recorder_errors"]:
        conditions.add("grader error")
        row.notes.append(_clean(
            "the grader could not record answers: " + ": ".join(
                t for t in (cell["ename"], cell["evalue"]) if t), run_dir))
    row.status = next(s for s in NOTEBOOK_STATUSES
                      if s in conditions or s == "ok")
    for name in outcome["expected"]:
        exercise = exercises.get(name)
        evidence = _pick_evidence(
            _load_evidence(outcome["evidence"] / f"{name}.pt", name),
            _load_evidence(outcome["evidence"] / f"{name}.final.pt", name))
        if evidence is None:
            evidence = {"exercise": name, "attempted": False,
                        "message": "no answer was recorded: the notebook "
                                   "stopped before this exercise"}
        result = exercise.grade(evidence, heldout.get(name))
        row.results[name] = exercises.Result(
            result.exercise, result.status,
            _clean(result.message, run_dir, limit=600), result.points,
            result.max_points)
    return row


def _count_once(rows):
    """Credit each learner's exercise once, in their best notebook."""
    from tlhelpers import exercises

    def rank(row, result):
        home = Path(row.file).stem == exercises.get(result.exercise).notebook
        return (result.points, home)

    best = {}
    for row in rows:
        for name, result in row.results.items():
            key = (row.student, name)
            if key not in best or rank(row, result) > rank(*best[key]):
                best[key] = (row, result)
    for row in rows:
        for name, result in list(row.results.items()):
            home, _ = best[(row.student, name)]
            if home is row:
                continue
            row.notes.append(f"{name} is also answered in {home.file}: "
                             "counted once, there")
            row.results[name] = exercises.Result(
                result.exercise, result.status, result.message, 0.0, 0.0)
    return rows


def _ungraded_row(outcome):
    sub = outcome["sub"]
    return GradedNotebook(sub.student, sub.file, "grader error",
                          notes=["the grader failed on this notebook"])


def grade(paths, out=None, timeout=kernels.NOTEBOOK_TIMEOUT,
          memory_mb=DEFAULT_MEMORY_MB, jobs=None, seed=None, progress=True,
          feedback_dir=None, sandbox=True, dask=None, text=None):
    """Grade notebooks (or folders of notebooks) into a Gradebook.

    Args:
        paths: notebooks and folders of notebooks.
        out: the gradebook CSV to write (atomically), with a feedback
            file per learner in ``<out stem>_feedback/``; None writes
            nothing.
        timeout: seconds a notebook's own cells may take in all (0: no
            limit); the cell running when it is spent is interrupted,
            then killed, and the learner's cells after it are skipped.
        memory_mb: memory a notebook's kernel may allocate (at least
            MIN_MEMORY_MB).
        jobs: notebooks run at once (default: default_jobs()).
        seed: the seed of the held-out images; None draws a secret one.
        sandbox: run each kernel in a bubblewrap sandbox; raises
            SandboxUnavailable where there is none. False runs kernels
            as this user, with a warning.
        dask: a Dask scheduler address, or "local:N" for a LocalCluster
            of N workers: each notebook is one task there (the same
            per-notebook run as here); None grades on this machine.
        text: a function of the Gradebook returning the text to write
            at `out` (another format); None writes Gradebook.to_csv().

    Returns:
        the Gradebook, rows sorted by learner and file.
    """
    from tqdm.auto import tqdm

    if timeout is None or not float(timeout) >= 0:
        raise ValueError(f"timeout must be >= 0 seconds (0: no limit), got "
                         f"{timeout}")
    if not int(memory_mb) >= MIN_MEMORY_MB:
        raise ValueError(
            f"memory_mb must be at least {MIN_MEMORY_MB} (what a course "
            f"kernel with a model needs), got {memory_mb}")
    jobs = default_jobs(memory_mb) if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if dask is not None:
        cluster.parse_address(dask)   # a bad address fails here, at once
        cluster.require_dask()
    seed_kind = "drawn" if seed is None else "given"
    seed = secrets.randbelow(2**31) if seed is None else int(seed)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    skipped = []
    subs = find_submissions([str(p) for p in paths], skipped)
    for path, reason in skipped:
        print(f"tlcourse grade: skipped {path}: {reason}", file=sys.stderr)
    if sandbox:
        problem = sandbox_problem()
        if problem:
            raise SandboxUnavailable(f"{problem}: {NO_SANDBOX_HELP}")
    else:
        warnings.warn("grading without a sandbox: learners' code runs as "
                      "you, with your files and network; grade untrusted "
                      "cohorts in the sandbox or a container",
                      stacklevel=2)
    run_dir = Path(tempfile.mkdtemp(prefix="tlcourse-grade-"))
    running, lock = set(), threading.Lock()
    try:
        heldout = _HeldOut(run_dir / "heldout", seed)
        settings = {"run_dir": run_dir, "heldout": heldout,
                    "timeout": float(timeout), "memory_mb": int(memory_mb),
                    "threads": kernels.jobs_threads(jobs),
                    "sandbox": bool(sandbox),
                    "read_only": _read_only_paths() if sandbox else []}
        rows = {}
        bar = tqdm(total=len(subs), desc="grading", unit="notebook",
                   disable=not progress)

        def finish(sub, result):
            """Judge one notebook's outcome (result() returns it)."""
            try:
                outcome, seconds = result()
                row = _judge(outcome, heldout, run_dir, memory_mb, timeout)
            except Exception as err:
                row = _ungraded_row({"sub": sub})
                row.notes.append(_clean(
                    f"{type(err).__name__}: {err}", run_dir))
                seconds = 0.0
            row.seconds = seconds
            rows[sub] = row
            bar.set_postfix_str(f"{sub.student}: {row.status}")
            bar.update()

        if dask is not None:
            _grade_on_cluster(dask, subs, settings, finish)
        else:
            _grade_here(subs, settings, jobs, running, lock, finish)
        bar.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    from tlhelpers import exercises

    ordered = _count_once([rows[s] for s in subs])
    names = [n for n in exercises.EXERCISES
             if any(n in row.results for row in ordered)]
    book = Gradebook(names, ordered, seed=seed_kind, skipped=skipped)
    if out is not None:
        book.write(out, feedback_dir, None if text is None else text(book))
    return book


def _grade_here(subs, settings, jobs, running, lock, finish):
    """Run every notebook on this machine, `jobs` at once."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_execute_submission, sub, i, settings,
                               running, lock): sub
                   for i, sub in enumerate(subs)}
        try:
            for future in as_completed(futures):
                finish(futures[future], future.result)
        except BaseException:
            for future in futures:
                future.cancel()
            with lock:
                for handle in list(running):
                    kernels.kill_tree(*handle)
            raise


# ------------------------------------------------------- on a cluster


def notebook_limit(timeout, exercises=3):
    """Return the longest a notebook's run may take, in seconds."""
    return ((timeout or 365 * 86400) + kernels.STARTUP_TIMEOUT
            + KILL_GRACE * 2
            + 30 + COLLECT_TIMEOUT * (exercises + 1))


def run_deadline(timeout, notebooks, workers, exercises=3):
    """Return the whole run's deadline on a cluster, in seconds.

    Every notebook at its limit, `workers` at once, each run twice (one
    retry), plus two minutes to start and gather.
    """
    rounds = -(-max(1, notebooks) // max(1, workers))
    return notebook_limit(timeout, exercises) * rounds * 2 + 120


def _grade_on_cluster(address, subs, settings, finish):
    """Send each notebook to a Dask worker as one task; judge it here.

    A task carries the notebook's bytes, its learner and file names, and
    the held-out *images* its exercises need (never the labels or the
    seed); it runs _execute_submission on the worker, as a local run
    does, and brings back the kernel's report and the evidence files.
    Judging, scores and writing stay in this process.
    """
    here, tasks = [], []
    for index, sub in enumerate(subs):
        task = _task(sub, index, settings)
        if task is None:  # nothing to run: judged here, as locally
            here.append((index, sub))
        else:
            tasks.append((index, sub, task))
    for index, sub in here:
        finish(sub, lambda: _execute_submission(
            sub, index, settings, set(), threading.Lock()))
    if not tasks:
        return
    with cluster.connect(address) as client:
        workers = max(1, sum(client.nthreads().values()))
        if address.strip().startswith(cluster.LOCAL_PREFIX):
            threads = kernels.jobs_threads(workers)
            for _, _, task in tasks:
                task["threads"] = threads
        most = max(len(task["expected"]) for _, _, task in tasks)
        deadline = run_deadline(settings["timeout"], len(tasks), workers,
                                most)

        def done(i, outcome):
            index, sub, _ = tasks[i]
            finish(sub, lambda: _unpack(outcome, sub, index, settings))

        cluster.run_tasks(client, _run_task, [t for _, _, t in tasks],
                          deadline, on_done=done)


def _task(sub, index, settings):
    """Return what a worker needs to grade one notebook, or None.

    None: the notebook needs no kernel (unreadable, not this course).
    """
    if sub.problem:
        return None
    try:
        data = Path(sub.path).read_bytes()
    except OSError:
        return None
    nb, problem = _read_notebook(sub.path)
    if problem:
        return None
    expected = _expected_exercises(nb)
    if not expected:
        return None
    heldout = {}
    for name in expected:
        if settings["heldout"].get(name) is not None:
            heldout[name] = settings["heldout"].file(name).read_bytes()
    return {"notebook": data, "student": sub.student, "file": sub.file,
            "index": index, "expected": expected, "heldout": heldout,
            "timeout": settings["timeout"],
            "memory_mb": settings["memory_mb"],
            "sandbox": settings["sandbox"], "threads": None}


class _ShippedHeldOut:
    """The held-out images a task brought: files only, no labels."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def file(self, name):
        """Return the images file of an exercise."""
        return self.folder / f"{name}.pt"

    def get(self, name, default=None):
        """Return True if the task brought images for `name`."""
        return True if self.file(name).is_file() else default


def _run_task(task):
    """Grade one notebook on a Dask worker; return report and evidence.

    The same run as on the grading machine (_execute_submission: sandbox,
    limits, its own copy of the held-out images), in a folder of the
    worker's that is removed afterwards.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="tlcourse-grade-"))
    running, lock = set(), threading.Lock()
    try:
        if task["sandbox"]:
            problem = sandbox_problem()
            if problem:
                raise SandboxUnavailable(
                    f"on Dask worker {_worker_name()}: {problem}: "
                    f"{NO_SANDBOX_HELP}")
        shipped = run_dir / "shipped"
        shipped.mkdir()
        for name, data in task["heldout"].items():
            (shipped / f"{name}.pt").write_bytes(data)
        notebook = run_dir / "submitted.ipynb"
        notebook.write_bytes(task["notebook"])
        threads = task["threads"] or kernels.jobs_threads(
            _worker_threads())
        settings = {"run_dir": run_dir, "heldout": _ShippedHeldOut(shipped),
                    "timeout": task["timeout"],
                    "memory_mb": task["memory_mb"], "threads": threads,
                    "sandbox": task["sandbox"], "die_with_parent": True,
                    "read_only": (_read_only_paths() if task["sandbox"]
                                  else [])}
        sub = Submission(notebook, task["student"], task["file"])
        try:
            outcome, seconds = _execute_submission(
                sub, task["index"], settings, running, lock)
        except BaseException:
            with lock:
                for handle in list(running):
                    kernels.kill_tree(*handle)
            raise
        evidence = {}
        if outcome["evidence"] is not None:
            for path in Path(outcome["evidence"]).iterdir():
                if stat.S_ISREG(os.lstat(path).st_mode):
                    evidence[path.name] = path.read_bytes()
        # The worker's folder reads as the grader's own in messages.
        report = json.loads(json.dumps(outcome["report"]).replace(
            json.dumps(str(run_dir))[1:-1], "<grading folder>"))
        return {"expected": outcome["expected"], "notes": outcome["notes"],
                "remarks": outcome["remarks"], "status": outcome["status"],
                "report": report, "evidence": evidence, "seconds": seconds}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _worker_threads():
    """Return the Dask worker threads on this worker's machine.

    Each kernel then gets its share of the machine's cores, as a local
    run with --jobs gives it.
    """
    try:
        from distributed import get_client, get_worker

        worker = get_worker()
        host = worker.address.rsplit(":", 1)[0]
        info = get_client().scheduler_info()["workers"].values()
        count = sum(int(w.get("nthreads", 1)) for w in info
                    if w.get("host") and host.endswith(w["host"]))
        return max(1, count or int(worker.state.nthreads))
    except Exception:
        return 1


def _worker_name():
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:
        return "(unknown)"


def _unpack(outcome, sub, index, settings):
    """Return (outcome, seconds) of a task, as _execute_submission does.

    Raises RuntimeError when the task failed twice or ran out of time.
    """
    if not outcome.ok:
        raise RuntimeError(f"on the Dask cluster: {outcome.error}")
    value = outcome.value
    evidence = settings["run_dir"] / f"{index:04d}" / "evidence"
    evidence.mkdir(parents=True)
    for name, data in value["evidence"].items():
        if Path(name).name == name and name.endswith(".pt"):
            (evidence / name).write_bytes(data)
    raw = {"sub": sub, "expected": value["expected"],
           "notes": value["notes"], "remarks": value["remarks"],
           "status": value["status"], "report": value["report"],
           "evidence": evidence}
    return raw, value["seconds"]


class _HeldOut:
    """The held-out sets of a run, drawn when a notebook first needs one.

    Images go to ``folder/<exercise>.pt`` (copied to each notebook);
    labels and the seed stay in the grading process's memory.
    """

    def __init__(self, folder, seed):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        self._seed = seed
        self._sets = {}
        self._lock = threading.Lock()

    def file(self, name):
        """Return the images file of an exercise, drawing it if needed."""
        self.get(name)
        return self.folder / f"{name}.pt"

    def get(self, name, default=None):
        """Return (PIL images, labels), or default if not graded so."""
        import torch

        from tlhelpers import exercises

        exercise = exercises.get(name)
        if exercise.task_spec is None:
            return default
        with self._lock:
            if name not in self._sets:
                images, labels = exercise.heldout(self._seed)
                torch.save(images, self.folder / f"{name}.pt")
                self._sets[name] = (exercises.to_pil(images), labels)
            return self._sets[name]


# ------------------------------------------------------------------ CLI

EPILOG = f"""\
exit codes:
  {EXIT_OK}    every notebook was graded and the gradebook written
       (whatever the learners' statuses)
  {EXIT_WRITE}    the gradebook could not be written (an existing one is
       left as it was)
  {EXIT_USAGE}    bad arguments, a missing path, no notebooks found, or a
       roster or points file that cannot be used
  {EXIT_NO_SANDBOX}    no sandbox on this machine ({NO_SANDBOX_HELP})
  {EXIT_UNGRADED}    the gradebook was written, but some notebooks were not
       graded: their rows say "grader error" (the grader failed, or
       a Dask task failed twice or ran past the run's deadline);
       regrade them
  {EXIT_CLUSTER}    --dask: Dask is not installed (pip install
       'tlhelpers[cluster]') or the scheduler cannot be reached; no
       gradebook was written
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); no gradebook was written
"""


DESCRIPTION = (
    "Grade submitted notebooks into a gradebook CSV, with a feedback file "
    "per learner. Each notebook runs in its own kernel, in a sandbox "
    "(bubblewrap), with a time and a memory limit.")
PARSER_TEXT = {"description": textwrap.fill(DESCRIPTION, 79),
               "epilog": EPILOG,
               "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser():
    """Return the argument parser of `tlcourse grade`."""
    return add_arguments(argparse.ArgumentParser(prog="tlcourse grade",
                                                 **PARSER_TEXT))


def add_arguments(parser):
    """Add the arguments of `tlcourse grade` to `parser`; return it."""
    parser.add_argument("submissions", nargs="+", metavar="SUBMISSION",
                        help="notebooks or folders of notebooks")
    parser.add_argument("--out", default="gradebook.csv",
                        help="gradebook CSV to write (default: "
                             "gradebook.csv); feedback goes to "
                             "<name>_feedback/ beside it")
    parser.add_argument("--timeout", type=kernels.seconds_argument,
                        default=kernels.NOTEBOOK_TIMEOUT, metavar="S",
                        help="seconds a notebook's own cells may take in "
                             "all; 0: no limit (default: "
                             f"{kernels.NOTEBOOK_TIMEOUT})")
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                        metavar="MB",
                        help="memory each notebook's kernel may allocate, "
                             f"at least {MIN_MEMORY_MB} (default: "
                             f"{DEFAULT_MEMORY_MB})")
    parser.add_argument("--jobs", type=kernels.jobs_argument,
                        default=None,
                        help="notebooks graded at once (default: "
                             f"{default_jobs()} on this machine)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the held-out images, to regrade "
                             "reproducibly (default: a secret one drawn "
                             "for each run)")
    parser.add_argument("--feedback-dir", default=None,
                        help="folder for the feedback files")
    parser.add_argument("--format", default="long",
                        choices=("long", "wide", "canvas"),
                        help="long: one row per notebook (default); "
                             "wide: one row per learner (id, name, points "
                             "per exercise, total, percent); canvas: "
                             "Canvas's gradebook import, with a Points "
                             "Possible row")
    parser.add_argument("--roster", default=None, metavar="CSV",
                        help="learners (columns id, name, optional email "
                             "and section): submission folders are matched "
                             "to them, learners with no submission get 0, "
                             "folders that match no one are flagged")
    parser.add_argument("--points", default=None, metavar="TOML",
                        help="points per exercise and partial credit, "
                             "e.g. [exercises] capstone = { points = 4, "
                             "partial = true } (default: the checkers' "
                             "own points)")
    parser.add_argument("--dask", default=None, metavar="ADDRESS",
                        help="grade on a Dask cluster, one task per "
                             "notebook: a scheduler address (tcp://host:"
                             "8786) or local:N for N worker processes here"
                             " (needs pip install 'tlhelpers[cluster]')")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run kernels without the sandbox, as you "
                             "(only for a cohort you trust)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar")
    return parser


def main(argv=None):
    """Run `tlcourse grade` on command-line words; return the exit code."""
    return run_command(build_parser().parse_args(argv))


def run_command(args):
    """Run `tlcourse grade` with parsed arguments; return the exit code."""
    start = time.monotonic()
    try:
        text, roster = _formatter(args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if args.no_sandbox:
                print("tlcourse grade: warning: grading without a sandbox:"
                      " learners' code runs as you, with your files and "
                      "network", file=sys.stderr)
            book = grade(args.submissions, out=args.out,
                         timeout=args.timeout, memory_mb=args.memory_mb,
                         jobs=args.jobs, seed=args.seed,
                         progress=not args.no_progress,
                         feedback_dir=args.feedback_dir,
                         sandbox=not args.no_sandbox, dask=args.dask,
                         text=text)
    except SandboxUnavailable as err:
        print(f"tlcourse grade: {err}", file=sys.stderr)
        return EXIT_NO_SANDBOX
    except cluster.ClusterError as err:
        print(f"tlcourse grade: {err}", file=sys.stderr)
        return EXIT_CLUSTER
    except (FileNotFoundError, ValueError) as err:
        print(f"tlcourse grade: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        print(f"tlcourse grade: cannot write the gradebook ({err}); an "
              "existing gradebook was left as it was", file=sys.stderr)
        return EXIT_WRITE
    except KeyboardInterrupt:
        print("tlcourse grade: interrupted; no gradebook was written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(book)
    out = Path(args.out)
    feedback = args.feedback_dir or out.with_name(out.stem + "_feedback")
    print(f"\nwrote {out} ({len(book.rows)} notebooks, {args.format} "
          f"format) and feedback in {feedback}/ in "
          f"{time.monotonic() - start:.0f} s")
    if roster is not None:
        _, unmatched = gradebook.match_roster(
            roster, [row.student for row in book.rows])
        for student in unmatched:
            where = ("left out of the Canvas import"
                     if args.format == "canvas" else "flagged in its rows")
            print(f"tlcourse grade: warning: {student!r} matches no one on "
                  f"the roster ({where}); rename the folder to the "
                  "learner's id, email or name", file=sys.stderr)
    ungraded = [row for row in book.rows if row.status == "grader error"]
    if ungraded:
        print(f"tlcourse grade: {len(ungraded)} notebook(s) not graded "
              "(status \"grader error\"): "
              + ", ".join(row.file for row in ungraded), file=sys.stderr)
        return EXIT_UNGRADED
    return EXIT_OK


def _formatter(args):
    """Return (function of a Gradebook giving its text, roster or None).

    Reads the roster and points files first, so a mistake in them stops
    the run before any notebook is graded. The long format with neither
    is today's gradebook: the function is None.
    """
    from tlhelpers import exercises

    roster = (gradebook.read_roster(args.roster) if args.roster
              else None)
    points = (gradebook.read_points(args.points, known=exercises.EXERCISES)
              if args.points else None)
    if args.format == "long" and roster is None and points is None:
        return None, None

    def text(book):
        if args.format != "long":
            return gradebook.render(book, args.format, roster, points)
        columns, rows = gradebook.long_rows(book,
                                            points or gradebook.Points())
        if roster is not None:
            _, unmatched = gradebook.match_roster(
                roster, [row["student"] for row in rows])
            for row in rows:
                if row["student"] in unmatched:
                    row["message"] = "; ".join(
                        m for m in ("not on the roster", row["message"])
                        if m)
        return gradebook.to_csv(columns, rows)

    return text, roster


if __name__ == "__main__":
    # `python -m tlhelpers.grading --worker SPEC` runs one notebook for
    # grade(); anything else is the command line.
    if sys.argv[1:2] == ["--worker"]:
        _execute(json.loads(Path(sys.argv[2]).read_text()))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
