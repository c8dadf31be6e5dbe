"""Grade submitted notebooks headlessly into a gradebook.

``tlcourse grade SUBMISSIONS... --out gradebook.csv`` (or ``grade()``):
each notebook, or each notebook found in a folder, runs in a temporary
copy, in its own kernel, with a time limit and a memory limit, several at
once. The grader adds cells of its own after each exercise and at the end;
they save *evidence* of the learner's answers (see tlhelpers.exercises)
from the kernel's variables, named by the exercise convention. The
evidence is judged afterwards in the grading process itself, which never
runs a learner's code, with a freshly imported copy of the checks. The
gradebook (one row per notebook: points per exercise, total, status,
message) and one feedback file per learner are written atomically.

Statuses, most serious first: "invalid notebook" (not readable as a
notebook), "not this course" (no exercise of this course in it),
"grader error", "timeout", "memory limit", "kernel died", "cell errors",
"edited checks" (a check cell deleted or changed; the answers are graded
anyway), "ok". A notebook's exercises are graded whatever its status.

Threat model
------------
What this isolation stops:

- printing fake results: scores never come from a notebook's output;
- redefining, monkeypatching or editing the checks (``check``, the
  ``exercises`` module in the kernel, a check cell): the grader records
  answers with a copy of the checks loaded from the installed file, and
  judges them in another process;
- forging the held-out accuracy: the kernel sees the held-out images but
  never their labels, and the score is computed outside the kernel;
- crashes, infinite loops, memory hogs and broken files: each notebook
  runs in its own kernel with a time limit (interrupt, then kill) and a
  memory limit; a crash in one cell does not stop the grading of the
  exercises after it, and one notebook's failure never stops the run;
- notebooks reading each other's files by accident: each runs in its own
  temporary folder, with its own feature cache.

What it does NOT stop: this is not a sandbox. The learner's code runs as
the instructor's user, with the instructor's files and network. A hostile
learner can read or delete files, open connections, read the grader's
code and imitate it, patch torch or the interpreter to forge what the
grader records, or reach other kernels' folders. Grade untrusted or
hostile cohorts inside a container or a virtual machine with no network
and only the submissions mounted (one container per run is enough).

Limits by operating system: on Linux the kernel gets RLIMIT_DATA =
memory_mb (the memory it can allocate) and RLIMIT_AS = memory_mb + 4 GB
(torch reserves about 3 GB of address space it never uses, so RLIMIT_AS
alone cannot be tight); on every system a watchdog also kills a kernel
whose resident memory (with its child processes) passes memory_mb + 1 GB.
macOS does not enforce these rlimits and Windows has none, so there the
watchdog alone limits memory. Time limits work everywhere.
"""

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

# Heavy imports (torch through tlhelpers.exercises, nbformat, nbclient)
# happen inside the functions that need them: `tlcourse grade --help`
# answers at once, and the worker process never imports torch.

DEFAULT_TIMEOUT = 900        # seconds for a notebook's own cells
DEFAULT_MEMORY_MB = 3072     # per kernel
COLLECT_TIMEOUT = 120        # seconds for each cell the grader adds
STARTUP_TIMEOUT = 60         # seconds for a kernel to start
KILL_GRACE = 10              # seconds a cell gets to obey an interrupt
MIN_CELL_SECONDS = 5         # even after the time is up, so that the
#                              exercises after an endless loop still run
AS_ALLOWANCE_MB = 4096       # address space torch reserves but never uses
WATCHDOG_SLACK_MB = 1024     # resident libraries on top of memory_mb
MAX_EVIDENCE_MB = 64         # larger evidence files are not loaded
STATUSES = ("invalid notebook", "not this course", "grader error",
            "timeout", "memory limit", "kernel died", "cell errors",
            "edited checks", "ok")
_COURSE_NOTEBOOK = re.compile(r"^\d\d_")
_CHECK_CALL = re.compile(r"exercises\.([a-z_]+)\.check\(")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def default_jobs(memory_mb=DEFAULT_MEMORY_MB):
    """Return how many notebooks to run at once (cores, memory, 4 at most)."""
    import psutil

    fit = psutil.virtual_memory().available // (memory_mb * 2**20)
    return max(1, min(4, os.cpu_count() or 1, fit))


# ----------------------------------------------------------- submissions


@dataclass(frozen=True)
class Submission:
    """One notebook to grade: where it is and whose it is."""

    path: Path
    student: str
    file: str


def find_submissions(paths):
    """Expand notebooks and folders into submissions, in a stable order.

    A notebook in a sub-folder belongs to the learner that sub-folder is
    named after (``alice/03_fine_tuning.ipynb``). A notebook on its own is
    named after its learner (``alice.ipynb``), unless its name is a course
    notebook's (``NN_...``): then its folder names the learner, and the
    file reads ``alice/03_fine_tuning.ipynb`` however it was given.
    """
    found = {}
    for arg in paths:
        root = Path(arg)
        if root.is_dir():
            for path in sorted(root.rglob("*.ipynb")):
                rel = path.relative_to(root)
                if any(part.startswith(".") for part in rel.parts):
                    continue  # .ipynb_checkpoints and other hidden copies
                if len(rel.parts) > 1:
                    entry = (path, rel.parts[0], rel.as_posix())
                else:
                    entry = _alone(path)
                found.setdefault(path.resolve(), entry)
        elif root.is_file():
            found.setdefault(root.resolve(), _alone(root))
        else:
            raise FileNotFoundError(f"no notebook or folder at {arg!r}")
    names = [(s, f) for _, s, f in found.values()]
    subs = [Submission(p, s, f if names.count((s, f)) == 1 else str(p))
            for p, s, f in found.values()]
    if not subs:
        raise ValueError(f"no notebooks (.ipynb) found in "
                         f"{', '.join(map(str, paths)) or 'nothing'}: pass "
                         "notebooks or folders of notebooks")
    return sorted(subs, key=lambda s: (s.student, s.file))


def _alone(path):
    """Return (path, learner, file) of a notebook not in a learner folder."""
    folder = path.resolve().parent.name
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
    """Graded notebooks, one row each, sorted by learner and file."""

    exercises: list
    rows: list

    @property
    def columns(self):
        """Return the CSV columns."""
        return (["student", "file"] + list(self.exercises)
                + ["total", "max_points", "status", "message"])

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
                          status=row.status, message=row.message)
            out.append(record)
        return out

    def to_csv(self):
        """Return the gradebook as CSV text."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns,
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records())
        return buffer.getvalue()

    def write(self, path, feedback_dir=None):
        """Write the CSV (atomically) and one feedback file per learner.

        Returns:
            the feedback files written.
        """
        from tlhelpers import files

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if feedback_dir is None:
            feedback_dir = path.with_name(path.stem + "_feedback")
        feedback_dir = Path(feedback_dir)
        feedback_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for student, text in self.feedback().items():
            target = feedback_dir / f"{_safe_name(student)}.md"
            files.write_text(target, text)
            written.append(target)
        # The gradebook last: it never points at feedback not yet written.
        files.write_text(path, self.to_csv())
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
        from tlhelpers.models import Table

        rows = [dict(r, message=_shorten(r["message"], 60))
                for r in self.records()]
        return Table(rows, columns=self.columns, title="Gradebook")

    def __str__(self):
        return str(self.table())

    def _repr_html_(self):
        return self.table()._repr_html_()


def _num(value):
    return f"{value:g}"


def _shorten(text, width):
    return text if len(text) <= width else text[:width - 3] + "..."


def _safe_name(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "learner"


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
    try:
        with warnings.catch_warnings():
            # Missing cell ids and the like: nbformat fixes them itself.
            warnings.simplefilter("ignore")
            nb = nbformat.reads(text, as_version=4)
    except Exception as err:
        return None, f"not a notebook: {_shorten(str(err), 200)}"
    return nb, None


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


_RECORDER = '''\
# Added by the grader: records the answers to {shown}.
def _tlh_grader_record():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_tlh_grader_exercises", {module!r})
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    fresh.record_answers({names!r}, globals(), {folder!r}, {heldout!r},
                         {suffix!r})
_tlh_grader_record()
del _tlh_grader_record
'''


def _instrument(nb, expected, evidence_dir, heldout_dir):
    """Add the grader's recording cells: after each exercise, at the end.

    The cells load the checks from the installed file, not from the
    kernel's (possibly patched) modules.
    """
    import nbformat

    from tlhelpers import exercises

    module = str(Path(exercises.__file__).resolve())

    def recorder(names, suffix):
        cell = nbformat.v4.new_code_cell(_RECORDER.format(
            shown=", ".join(names), module=module, names=list(names),
            folder=str(evidence_dir), heldout=str(heldout_dir),
            suffix=suffix))
        cell.metadata["tlhelpers_grader"] = True
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


# ------------------------------------------------------ the worker side


def _limit_memory(memory_mb):
    """Cap this process's memory; the kernel it starts inherits the cap."""
    try:
        import resource
    except ImportError:  # Windows: the watchdog alone limits memory
        return
    limit = int(memory_mb) * 2**20
    for name, value in (("RLIMIT_DATA", limit),
                        ("RLIMIT_AS", limit + AS_ALLOWANCE_MB * 2**20)):
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # macOS refuses some limits; the watchdog still applies


def _kill_tree(pid):
    """Kill a process and everything it started."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


class _Watchdog(threading.Thread):
    """Kill the kernel when a cell ignores its interrupt or memory runs out.

    ``deadline`` (time.monotonic) is moved forward at every cell start.
    """

    def __init__(self, limit_bytes, interval=0.2):
        super().__init__(daemon=True)
        self.limit_bytes = limit_bytes
        self.interval = interval
        self.pid = None
        self.deadline = None
        self.reason = None
        self._stop_event = threading.Event()

    def stop(self):
        """Stop watching."""
        self._stop_event.set()

    def _rss(self):
        from tlhelpers.runner import tree_rss

        return tree_rss(self.pid) or 0

    def run(self):
        """Poll every `interval` seconds until stopped."""
        while not self._stop_event.wait(self.interval):
            if self.pid is None or self.reason is not None:
                continue
            if self._rss() > self.limit_bytes:
                self.reason = "memory"
            elif (self.deadline is not None
                  and time.monotonic() > self.deadline):
                self.reason = "timeout"
            if self.reason is not None:
                _kill_tree(self.pid)


def _execute(spec):
    """Run one instrumented notebook; write what happened as JSON.

    Runs in a worker process, one per notebook: the kernel it starts
    inherits its memory limits.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    from tlhelpers import runner

    _limit_memory(spec["memory_mb"])
    nb = nbformat.read(spec["notebook"], as_version=4)
    watchdog = _Watchdog((spec["memory_mb"] + WATCHDOG_SLACK_MB) * 2**20)
    budget = {"left": float(spec["timeout"]), "start": None,
              "allotted": None}
    timed_out = set()
    report = {"kernel": "ok", "cells": [], "recorder_errors": []}

    def is_grader(cell):
        return bool(cell.metadata.get("tlhelpers_grader"))

    def timeout_for(cell):
        if is_grader(cell):
            allotted = spec["collect_timeout"]
        else:
            allotted = max(spec["min_cell_seconds"],
                           int(budget["left"] + 0.999))
        budget["start"], budget["allotted"] = time.monotonic(), allotted
        watchdog.deadline = time.monotonic() + allotted + spec["kill_grace"]
        return allotted

    def on_start(cell, cell_index):
        if watchdog.pid is None and client.km is not None:
            watchdog.pid = client.km.provisioner.pid
            Path(spec["kernel_pid"]).write_text(str(watchdog.pid))

    def on_done(cell, cell_index, execute_reply=None):
        if budget["start"] is None:
            return
        spent = time.monotonic() - budget["start"]
        if not is_grader(cell):
            budget["left"] -= spent
        if spent >= budget["allotted"]:
            timed_out.add(cell_index)
        budget["start"] = None
        watchdog.deadline = None

    env = dict(spec["env"])
    client = NotebookClient(
        nb, km=runner.this_python_kernel(), timeout_func=timeout_for,
        allow_errors=True, interrupt_on_timeout=True,
        startup_timeout=STARTUP_TIMEOUT, record_timing=False,
        resources={"metadata": {"path": spec["cwd"]}},
        on_cell_start=on_start, on_cell_executed=on_done)
    watchdog.start()
    try:
        client.execute(env=env)
    except DeadKernelError:
        report["kernel"] = {"memory": "killed for memory",
                            "timeout": "killed at time limit"}.get(
                                watchdog.reason, "died")
    except Exception as err:  # the kernel never started, or nbclient broke
        if watchdog.reason is not None:
            report["kernel"] = {"memory": "killed for memory",
                                "timeout": "killed at time limit"}[
                                    watchdog.reason]
        else:
            report["kernel"] = f"failed: {type(err).__name__}: {err}"
    finally:
        watchdog.stop()
    number = 0
    for index, cell in enumerate(nb.cells):
        grader = is_grader(cell)
        number += not grader
        errors = [out for out in cell.get("outputs", [])
                  if out.get("output_type") == "error"]
        if index in timed_out and not errors:
            errors = [{}]  # interrupted inside C code: no traceback
        for out in errors:
            entry = {"cell": number,
                     "first_line": runner.first_line(cell.source),
                     "ename": out.get("ename", ""),
                     "evalue": out.get("evalue", ""),
                     "timed_out": index in timed_out}
            report["recorder_errors" if grader else "cells"].append(entry)
    Path(spec["report"]).write_text(json.dumps(report))




# ------------------------------------------------------ the parent side


def _with_package_path(env):
    """Let a child process import this tlhelpers, installed or not."""
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def _kernel_env(cache_dir, threads):
    """Return the environment of a grading kernel."""
    from tlhelpers import runner

    env = _with_package_path(runner.kernel_env())
    env.pop("TLH_STRICT", None)  # checks in the notebook must not stop it
    env.update(MPLBACKEND="Agg", TQDM_DISABLE="1", PYTHONHASHSEED="0",
               TLH_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    return env


def _run_worker(spec_path, work, hard_timeout, running, lock):
    """Start a worker for one notebook and wait; kill it past the limit."""
    with open(work / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tlhelpers.grading", "--worker",
             str(spec_path)],
            cwd=work / "worker", stdout=log, stderr=subprocess.STDOUT,
            env=_with_package_path(dict(os.environ)),
            start_new_session=True)
        with lock:
            running.add(proc.pid)
        try:
            proc.wait(timeout=hard_timeout)
            killed = False
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            killed = True
        finally:
            with lock:
                running.discard(proc.pid)
    return killed


def _kill_orphan_kernel(pid_file):
    """Kill a kernel left behind by a worker that was killed."""
    import psutil

    try:
        pid = int(Path(pid_file).read_text())
        proc = psutil.Process(pid)
        if any("ipykernel" in part for part in proc.cmdline()):
            _kill_tree(pid)
    except (OSError, ValueError, psutil.Error):
        pass


def _execute_submission(sub, index, settings, running, lock):
    """Prepare, run and record one submission; return its raw outcome."""
    import nbformat

    start = time.monotonic()
    outcome = {"sub": sub, "expected": [], "notes": [], "status": None,
               "report": None, "evidence": None}
    nb, problem = _read_notebook(sub.path)
    if problem:
        outcome.update(status="invalid notebook", notes=[problem])
        return outcome, time.monotonic() - start
    language = (nb.metadata.get("kernelspec", {}).get("language")
                or nb.metadata.get("language_info", {}).get("name")
                or "python")
    expected = _expected_exercises(nb)
    if not expected or str(language).lower() != "python":
        why = ("no cell of it is tagged exercise:<name> or check:<name> "
               "with an exercise of this course" if not expected
               else f"it is a {language} notebook")
        outcome.update(status="not this course", notes=[why])
        return outcome, time.monotonic() - start
    outcome["expected"] = expected
    outcome["notes"] = _convention_notes(nb, expected)
    work = settings["run_dir"] / f"{index:04d}"
    for sub_dir in ("notebook", "worker", "cache"):
        (work / sub_dir).mkdir(parents=True)
    evidence = Path(tempfile.mkdtemp(prefix="answers-", dir=work))
    outcome["evidence"] = evidence
    nb = _instrument(nb, expected, evidence, settings["heldout_dir"])
    notebook = work / "notebook" / "submission.ipynb"
    nbformat.write(nb, str(notebook))
    spec = {"notebook": str(notebook), "cwd": str(work / "notebook"),
            "timeout": settings["timeout"],
            "collect_timeout": COLLECT_TIMEOUT,
            "kill_grace": KILL_GRACE, "min_cell_seconds": MIN_CELL_SECONDS,
            "memory_mb": settings["memory_mb"],
            "report": str(work / "report.json"),
            "kernel_pid": str(work / "kernel.pid"),
            "env": _kernel_env(work / "cache", settings["threads"])}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    hard = (settings["timeout"] + STARTUP_TIMEOUT + KILL_GRACE * 2 + 30
            + COLLECT_TIMEOUT * (len(expected) + 1))
    killed = _run_worker(spec_path, work, hard, running, lock)
    _kill_orphan_kernel(work / "kernel.pid")
    try:
        outcome["report"] = json.loads((work / "report.json").read_text())
    except (OSError, ValueError):
        log = (work / "worker.log").read_text(errors="replace")
        last = log.strip().splitlines()[-1:] or ["no output"]
        outcome["report"] = {"kernel": "killed at time limit" if killed
                             else f"failed: the grader's worker stopped "
                                  f"({last[0]})",
                             "cells": [], "recorder_errors": []}
    return outcome, time.monotonic() - start


def _load_evidence(path, name):
    import torch

    if not path.exists() or path.stat().st_size > MAX_EVIDENCE_MB * 2**20:
        return None
    try:
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


def _judge(outcome, labels, run_dir, memory_mb):
    """Turn a submission's outcome into a gradebook row."""
    from tlhelpers import exercises

    sub = outcome["sub"]
    row = GradedNotebook(sub.student, sub.file, outcome["status"] or "ok",
                         notes=[_clean(n, run_dir) for n in outcome["notes"]])
    if outcome["status"]:
        return row
    # The notes so far say which exercise cells were deleted or edited.
    conditions = {"edited checks"} if outcome["notes"] else set()
    report = outcome["report"]
    for cell in report["cells"]:
        where = f"cell {cell['cell']}"
        if cell["first_line"]:
            where += f" ({_clean(cell['first_line'], run_dir, 60)})"
        error = _clean(": ".join(t for t in (cell["ename"], cell["evalue"])
                                 if t), run_dir)
        if cell["timed_out"]:
            conditions.add("timeout")
            row.notes.append(f"{where} ran past the time limit and was "
                             "interrupted")
        elif ("MemoryError" in cell["ename"]
              or "can't allocate memory" in cell["evalue"]):
            conditions.add("memory limit")
            row.notes.append(f"{where} ran out of memory ({memory_mb} MB "
                             f"allowed): {error}")
        else:
            conditions.add("cell errors")
            row.notes.append(f"{where} raised {error}")
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
            f"the grader could not record answers: {cell['ename']}: "
            f"{cell['evalue']}", run_dir))
    row.status = next(s for s in STATUSES
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
        result = exercise.grade(evidence, labels.get(name))
        row.results[name] = exercises.Result(
            result.exercise, result.status,
            _clean(result.message, run_dir, limit=600), result.points,
            result.max_points)
    return row


def _ungraded_row(outcome):
    sub = outcome["sub"]
    return GradedNotebook(sub.student, sub.file, "grader error",
                          notes=["the grader failed on this notebook"])


def grade(paths, out=None, timeout=DEFAULT_TIMEOUT,
          memory_mb=DEFAULT_MEMORY_MB, jobs=None, seed=None, progress=True,
          feedback_dir=None):
    """Grade notebooks (or folders of notebooks) into a Gradebook.

    Args:
        paths: notebooks and folders of notebooks.
        out: the gradebook CSV to write (atomically), with a feedback
            file per learner in ``<out stem>_feedback/``; None writes
            nothing.
        timeout: seconds a notebook's own cells may take in all; a cell
            past it is interrupted, then killed.
        memory_mb: memory a notebook's kernel may allocate.
        jobs: notebooks run at once (default: default_jobs()).
        seed: the seed of the held-out images (default
            exercises.GRADING_SEED); choose your own to keep it private.

    Returns:
        the Gradebook, rows sorted by learner and file.
    """
    from tqdm.auto import tqdm

    from tlhelpers import exercises

    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if not int(memory_mb) >= 256:
        raise ValueError(f"memory_mb must be at least 256, got {memory_mb}")
    jobs = default_jobs(memory_mb) if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    seed = exercises.GRADING_SEED if seed is None else int(seed)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    subs = find_submissions([str(p) for p in paths])
    run_dir = Path(tempfile.mkdtemp(prefix="tlcourse-grade-"))
    running, lock = set(), threading.Lock()
    try:
        heldout_dir = run_dir / "heldout"
        labels = _write_heldout(heldout_dir, seed)
        settings = {"run_dir": run_dir, "heldout_dir": heldout_dir,
                    "timeout": float(timeout), "memory_mb": int(memory_mb),
                    "threads": max(1, (os.cpu_count() or 1) // jobs)}
        rows = {}
        bar = tqdm(total=len(subs), desc="grading", unit="notebook",
                   disable=not progress)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_execute_submission, sub, i, settings,
                                   running, lock): sub
                       for i, sub in enumerate(subs)}
            try:
                for future in as_completed(futures):
                    sub = futures[future]
                    try:
                        outcome, seconds = future.result()
                        row = _judge(outcome, labels, run_dir, memory_mb)
                    except Exception as err:
                        row = _ungraded_row({"sub": sub})
                        row.notes.append(_clean(
                            f"{type(err).__name__}: {err}", run_dir))
                        seconds = 0.0
                    row.seconds = seconds
                    rows[sub] = row
                    bar.set_postfix_str(f"{sub.student}: {row.status}")
                    bar.update()
            except BaseException:
                for future in futures:
                    future.cancel()
                with lock:
                    for pid in list(running):
                        _kill_tree(pid)
                raise
        bar.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    names = [n for n in exercises.EXERCISES
             if any(n in row.results for row in rows.values())]
    book = Gradebook(names, [rows[s] for s in subs])
    if out is not None:
        book.write(out, feedback_dir)
    return book


def _write_heldout(folder, seed):
    """Save each held-out image set (no labels); return the labels."""
    import torch

    from tlhelpers import exercises

    folder.mkdir(parents=True)
    labels = {}
    for exercise in exercises.EXERCISES.values():
        if exercise.task_spec is None:
            continue
        images, labels[exercise.name] = exercise.heldout(seed)
        torch.save(images, folder / f"{exercise.name}.pt")
    return labels


# ------------------------------------------------------------------ CLI


def build_parser():
    """Return the argument parser of `tlcourse grade`."""
    parser = argparse.ArgumentParser(
        prog="tlcourse grade",
        description="Grade submitted notebooks into a gradebook CSV, with "
                    "a feedback file per learner. Each notebook runs in its"
                    " own kernel with a time and a memory limit. This is "
                    "not a sandbox: grade hostile cohorts in a container.")
    parser.add_argument("submissions", nargs="+", metavar="SUBMISSION",
                        help="notebooks or folders of notebooks")
    parser.add_argument("--out", default="gradebook.csv",
                        help="gradebook CSV to write (default: "
                             "gradebook.csv); feedback goes to "
                             "<name>_feedback/ beside it")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds a notebook's cells may take in all "
                             f"(default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                        help="memory each notebook's kernel may allocate "
                             f"(default: {DEFAULT_MEMORY_MB})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="notebooks graded at once (default: "
                             f"{default_jobs()} on this machine)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the held-out images (choose your "
                             "own to keep them private)")
    parser.add_argument("--feedback-dir", default=None,
                        help="folder for the feedback files")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar")
    return parser


def main(argv=None):
    """Run `tlcourse grade`; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        book = grade(args.submissions, out=args.out, timeout=args.timeout,
                     memory_mb=args.memory_mb, jobs=args.jobs,
                     seed=args.seed, progress=not args.no_progress,
                     feedback_dir=args.feedback_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"tlcourse grade: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"tlcourse grade: cannot write the gradebook ({err}); an "
              "existing gradebook was left as it was", file=sys.stderr)
        return 1
    print(book)
    out = Path(args.out)
    feedback = args.feedback_dir or out.with_name(out.stem + "_feedback")
    print(f"\nwrote {out} ({len(book.rows)} notebooks) and feedback in "
          f"{feedback}/ in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    # `python -m tlhelpers.grading --worker SPEC` runs one notebook for
    # grade(); anything else is the command line.
    if sys.argv[1:2] == ["--worker"]:
        _execute(json.loads(Path(sys.argv[2]).read_text()))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
