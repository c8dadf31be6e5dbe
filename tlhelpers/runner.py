"""Run the course notebooks headless and write a browsable HTML build.

Each notebook runs in a fresh kernel through tlhelpers.kernels (the same
executor the grader uses), which also measures its peak memory. nbformat,
nbconvert and tqdm are imported when a build runs, so `tlcourse --help`
answers at once.
"""

import dataclasses
import datetime
import html
import importlib
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from tlhelpers import config, files, kernels
from tlhelpers.kernels import CellError

# NN_snake_case.ipynb, the course's naming rule for its notebooks.
NOTEBOOK_NAME = re.compile(r"^\d{2}_[A-Za-z0-9_]+\.ipynb$")
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


@dataclasses.dataclass
class NotebookResult:
    """What happened to one notebook of a build."""

    name: str
    source: Path
    status: str = "not run"
    seconds: float = 0.0
    peak_mem_mb: float = 0.0
    error: CellError = None
    ipynb: Path = None
    html: Path = None
    html_error: str = None

    def to_dict(self):
        """Return a JSON-ready summary of this result."""
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "peak_mem_mb": round(self.peak_mem_mb, 1),
            "error": None if self.error is None else str(self.error),
            "cell": None if self.error is None else self.error.cell,
            "ipynb": None if self.ipynb is None else self.ipynb.name,
            "html": None if self.html is None else self.html.name,
            "html_error": self.html_error,
        }


@dataclasses.dataclass
class Build:
    """The notebooks of one `tlcourse run`, and where its index page is."""

    results: list
    index: Path
    mode: str

    @property
    def ok(self):
        """True when every notebook ran without an error."""
        return all(r.status == "passed" for r in self.results)

    @property
    def failures(self):
        """The results of the notebooks that failed."""
        return [r for r in self.results if r.status == "failed"]


def course_notebooks(course_dir):
    """List the course notebooks (notebooks/NN_name.ipynb) in order."""
    folder = Path(course_dir) / "notebooks"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and NOTEBOOK_NAME.match(p.name))


def find_course_dir(start=None):
    """Find the course folder: the first one with notebooks/NN_*.ipynb.

    Looks in `start` (default: the current folder) and its parents only:
    outside a course folder there is none (the installed package's own
    folder is never used in its place). Returns None when there is none.
    """
    start = Path.cwd() if start is None else Path(start)
    start = start.resolve()
    for folder in (start, *start.parents):
        if course_notebooks(folder):
            return folder
    return None


def kernel_env(environ=None, smoke=False, solutions=False):
    """Return the environment the notebook kernels run with."""
    env = dict(os.environ if environ is None else environ)
    if smoke:
        env["TLH_SMOKE"] = "1"
    if solutions:
        # With the reference answers in place every check must pass:
        # strict mode turns a failing check into a failing cell.
        env["TLH_STRICT"] = "1"
    # A kernel draws inline, as in Jupyter: an MPLBACKEND meant for scripts
    # (CI sets Agg) would leave the HTML pages without their plots.
    env["MPLBACKEND"] = INLINE_BACKEND
    # Silences the debugger's frozen-modules warning on every kernel start.
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # Nobody watches a headless run: no progress bars (config.show_progress).
    env.setdefault("TLH_PROGRESS", "0")
    # Threads and OpenMP waiting (tlhelpers.kernels); a value set wins.
    for key, value in kernels.runtime_env().items():
        env.setdefault(key, value)
    return env


def export_html(nb, path):
    """Render an executed notebook to a standalone HTML page at `path`."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    files.write_text(path, body)
    return Path(path)


def execute_notebook(path, out_dir, timeout=kernels.NOTEBOOK_TIMEOUT,
                     env=None, cwd=None, name=None, on_cell=None,
                     memory=None):
    """Run one notebook in a fresh kernel; write it executed, and as HTML.

    Args:
        path: the notebook to run.
        out_dir: folder for the executed `.ipynb` and its `.html`.
        timeout: seconds the notebook's own cells may take in all
            (None or 0: no limit).
        env: the kernel's environment (default: kernel_env()).
        cwd: the kernel's working folder (default: the notebook's folder).
        name: file name of the outputs (default: the notebook's name).
        on_cell: called as on_cell(index, count) before each cell runs.
        memory: the kernels.MemorySampler that follows the kernel (its
            pid is the kernel's once it runs); default: a new one.

    Returns:
        NotebookResult with status "passed" or "failed".
    """
    import nbformat

    kernels.check_timeout(timeout)
    path = Path(path)
    out_dir = Path(out_dir)
    name = name or path.name
    nb = nbformat.read(path, as_version=4)
    cwd = Path(cwd) if cwd is not None else path.resolve().parent
    result = NotebookResult(name=name, source=path)
    memory = memory or kernels.MemorySampler(interval=0.05)
    start = time.perf_counter()
    run = kernels.run_notebook(nb, kernels.kernel_manager(),
                               env or kernel_env(), cwd, timeout=timeout,
                               memory=memory, on_cell=on_cell)
    result.seconds = time.perf_counter() - start
    result.peak_mem_mb = memory.peak_bytes / 2**20
    if run.error is None:
        result.status = "passed"
    else:
        result.status = "failed"
        result.error = kernels.cell_error(nb, run.index, run.error)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.ipynb = out_dir / name
    files.write_text(result.ipynb, nbformat.writes(nb))
    try:
        result.html = export_html(nb, out_dir / (Path(name).stem + ".html"))
    except Exception as exc:  # the run counts; a missing page is a warning
        result.html_error = kernels.error_line(exc)
    return result


def solutions_filler():
    """Return tlhelpers.exercises.fill_solutions, or explain its absence."""
    try:
        exercises = importlib.import_module("tlhelpers.exercises")
    except ImportError as exc:
        raise RuntimeError(
            "--solutions needs tlhelpers.exercises, which failed to import "
            f"({exc}); reinstall the course with: pip install -e .") from exc
    fill = getattr(exercises, "fill_solutions", None)
    if fill is None:
        raise RuntimeError(
            "--solutions needs tlhelpers.exercises.fill_solutions, which "
            "this version of the course does not have; run without "
            "--solutions")
    return fill


def format_seconds(seconds):
    """Format a duration for people: "12.3 s" or "4 min 05 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto;
       max-width: 60em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35em .7em;
         border-bottom: 1px solid #ddd; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; }
.passed { color: #1a7f37; font-weight: bold; }
.failed { color: #cf222e; font-weight: bold; }
.not-run { color: #777; }
code { font-size: .9em; }
"""


def _href(path):
    return html.escape(urllib.parse.quote(Path(path).name))


def render_index(build, meta):
    """Return the HTML of the index page for a build."""
    rows = []
    for i, r in enumerate(build.results, 1):
        status = html.escape(r.status)
        css = r.status.replace(" ", "-")
        if r.html is not None:
            link = (f'<a href="{_href(r.html)}">'
                    f"{html.escape(r.name)}</a>")
        else:
            link = html.escape(r.name)
        ran = r.status != "not run"
        duration = format_seconds(r.seconds) if ran else ""
        memory = f"{r.peak_mem_mb:.0f} MiB" if ran else ""
        details = "" if r.error is None else (
            f"<code>{html.escape(str(r.error))}</code>")
        if r.html_error:
            details += (f"<br>no HTML page: "
                        f"<code>{html.escape(r.html_error)}</code>")
        ipynb = "" if r.ipynb is None else (
            f'<a href="{_href(r.ipynb)}">.ipynb</a>')
        rows.append(
            f"<tr><td>{i}</td><td>{link}</td>"
            f'<td class="{css}">{status}</td>'
            f'<td class="num">{duration}</td>'
            f'<td class="num">{memory}</td><td>{ipynb}</td>'
            f"<td>{details}</td></tr>")
    passed = sum(r.status == "passed" for r in build.results)
    total = sum(r.seconds for r in build.results)
    facts = " | ".join(f"{html.escape(k)} {html.escape(str(v))}"
                       for k, v in meta.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Course build: {passed} of {len(build.results)} passed</title>
<style>{_STYLE}</style></head>
<body>
<h1>Transfer-learning workbook: build</h1>
<p>{passed} of {len(build.results)} notebooks passed in
{format_seconds(total)} ({html.escape(build.mode)} mode).</p>
<p><small>{facts}</small></p>
<table>
<thead><tr><th>#</th><th>notebook</th><th>status</th><th>duration</th>
<th>peak memory</th><th>executed</th><th>error</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p><small>Peak memory: the largest resident memory of the notebook's
kernel process and its children.</small></p>
</body></html>
"""


def write_index(build, meta=None):
    """Write index.html and build.json for a build; return the index path."""
    meta = dict(meta or {})
    files.write_text(build.index, render_index(build, meta))
    summary = {"mode": build.mode, "ok": build.ok, **meta,
               "notebooks": [r.to_dict() for r in build.results]}
    files.write_text(build.index.with_name("build.json"),
                json.dumps(summary, indent=1) + "\n")
    return build.index


def _build_meta(mode):
    import torch

    return {
        "built": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": mode,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# Memory a course kernel is given room for when notebooks run side by side
# (the budget of benchmarks/bench_notebooks.py, plus slack).
KERNEL_MEMORY_MB = 2048


def run_course(notebooks, out_dir, smoke=False,
               timeout=kernels.NOTEBOOK_TIMEOUT,
               keep_going=False, solutions=False, progress=True,
               environ=None, jobs=1):
    """Run notebooks, each in a fresh kernel; write an HTML build.

    Runs `jobs` notebooks at once (None: kernels.default_jobs), each
    kernel with its share of the cores unless the environment sets
    OMP_NUM_THREADS; they start in order and the build lists them in
    order. Stops starting notebooks at the first failure unless
    `keep_going`; the ones not run are listed as "not run". With
    `solutions`, each notebook runs with the reference answers filled in
    and in strict mode.

    Returns:
        Build: the results, the index page's path and the mode.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    kernels.check_timeout(timeout)
    notebooks = [Path(p) for p in notebooks]
    if not notebooks:
        raise ValueError("no notebooks to run: name some, or run tlcourse "
                         "from the course folder")
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"notebook not found: {', '.join(missing)}; check the path "
            "(course notebooks are notebooks/NN_name.ipynb)")
    names = [p.name for p in notebooks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two notebooks named {', '.join(twice)}: their "
                         "outputs would overwrite each other; run them "
                         "with different --out folders")
    if jobs is None:
        jobs = kernels.default_jobs(KERNEL_MEMORY_MB)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a whole number, 1 or more (the "
                         f"notebooks run at once), got {jobs!r}")
    jobs = min(jobs, len(notebooks))
    given = dict(os.environ if environ is None else environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in given:
        given.update(kernels.thread_env(kernels.jobs_threads(jobs)))
    fill = solutions_filler() if solutions else None
    env = kernel_env(given, smoke=smoke, solutions=solutions)
    mode = "SMOKE" if config.smoke_mode(env) else "full"
    if solutions:
        mode += " + solutions"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build = Build(results=[NotebookResult(name=p.name, source=p)
                           for p in notebooks],
                  index=out_dir / "index.html", mode=mode)
    bar = tqdm(total=len(notebooks), desc="notebooks", unit="nb",
               disable=not progress, file=sys.stderr)

    samplers = {}   # notebook index: the sampler that knows its kernel
    cancelled = threading.Event()

    def run_one(i, path):
        def on_cell(index, count, name=path.name):
            bar.set_postfix_str(f"{name} cell {index + 1}/{count}")

        if cancelled.is_set():
            return NotebookResult(name=path.name, source=path)
        samplers[i] = kernels.MemorySampler(interval=0.05)

        with tempfile.TemporaryDirectory() as tmp:
            source = path
            try:
                if fill is not None:
                    source = Path(tmp) / path.name
                    fill(path, source)
            except Exception as exc:
                result = NotebookResult(
                    name=path.name, source=path, status="failed",
                    error=CellError(
                        cell=None, cells=0, first_line="",
                        ename=type(exc).__name__,
                        evalue=f"filling in the solutions: {exc}"))
            else:
                result = execute_notebook(
                    source, out_dir, timeout=timeout, env=env,
                    cwd=path.resolve().parent, name=path.name,
                    on_cell=on_cell, memory=samplers[i])
        result.source = path
        return result

    def kill_running(running):
        """Stop the kernels still running (Ctrl-C in the main thread
        does not reach the threads that wait on them)."""
        cancelled.set()
        killed = set()
        while not all(f.done() for f in running):
            for future, i in running.items():
                pid = getattr(samplers.get(i), "pid", None)
                if pid is not None and pid not in killed \
                        and not future.done():
                    kernels.kill_tree(pid)
                    killed.add(pid)
            wait(running, timeout=0.5)

    def record(i, result):
        """Keep a notebook's result; return True if no more may start."""
        build.results[i] = result
        bar.update(1)
        return result.status == "failed" and not keep_going

    waiting = list(enumerate(notebooks))
    running = {}
    try:
        if jobs == 1:  # in this thread: Ctrl-C stops the kernel at once
            for i, path in waiting:
                if record(i, run_one(i, path)):
                    break
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                try:
                    stop = False
                    while running or (waiting and not stop):
                        while waiting and not stop and len(running) < jobs:
                            i, path = waiting.pop(0)
                            running[pool.submit(run_one, i, path)] = i
                        finished, _ = wait(running,
                                           return_when=FIRST_COMPLETED)
                        for future in finished:
                            stop |= record(running.pop(future),
                                           future.result())
                except BaseException:
                    kill_running(running)
                    raise
    finally:
        bar.close()
        write_index(build, _build_meta(mode))
    return build
