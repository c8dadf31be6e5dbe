"""Run the course notebooks headless and write a browsable HTML build.

Heavy imports (torch through config, nbformat, nbclient) happen inside the
functions that need them, so `tlcourse --help` answers at once.
"""

import dataclasses
import datetime
import html
import importlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import psutil

from tlhelpers import files, kernels

# NN_snake_case.ipynb, the course's naming rule for its notebooks.
NOTEBOOK_NAME = re.compile(r"^\d{2}_[A-Za-z0-9_]+\.ipynb$")
# Seconds a notebook's own cells may take in all (0: no limit): the same
# meaning, and the same default, as in `tlcourse grade`.
DEFAULT_TIMEOUT = 900
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


@dataclasses.dataclass
class CellError:
    """Where and how a notebook stopped: a cell (counted from 1) and why."""

    cell: int
    cells: int
    first_line: str
    ename: str
    evalue: str

    def __str__(self):
        if self.cell is None:
            return f"before the first cell: {self.ename}: {self.evalue}"
        where = f"cell {self.cell} of {self.cells}"
        if self.first_line:
            where += f" ({self.first_line})"
        return f"{where}: {self.ename}: {self.evalue}"


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
    # Threads and OpenMP waiting (tlhelpers.kernels); a value set wins.
    for key, value in kernels.runtime_env().items():
        env.setdefault(key, value)
    return env


def _read_hwm(pid):
    """Return the kernel's peak RSS from Linux's VmHWM, or 0 if unknown."""
    # Exact high-water mark kept by Linux; polling alone can miss a spike.
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss(pid):
    """Resident memory of a process and all its children, in bytes.

    None when the process is gone; children that exit while being
    measured are skipped.
    """
    try:
        proc = psutil.Process(pid)
        rss = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            rss += child.memory_info().rss
        except psutil.Error:
            pass
    return rss


class PeakMemory:
    """Track the peak resident memory of a process and its children.

    A background thread polls psutil every `interval` seconds; on Linux the
    process's own high-water mark (VmHWM) is read as well, so short spikes
    between two polls still count. Use as a context manager.
    """

    def __init__(self, pid, interval=0.05):
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def sample(self):
        """Measure once now and return the peak so far, in bytes."""
        rss = tree_rss(self.pid)
        if rss is None:
            return self.peak_bytes
        self.peak_bytes = max(self.peak_bytes, rss, _read_hwm(self.pid))
        return self.peak_bytes

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        return False


def this_python_kernel():
    """Return a kernel manager that starts ipykernel in this Python.

    A `python3` kernel spec found first on the Jupyter path may belong to
    another Python (one without tlhelpers); the course must run in the
    environment tlcourse was installed in.
    """
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class ThisPythonSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(resource_dir="", **get_kernel_dict())

    km = AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=ThisPythonSpecs())
    # Encrypt the kernel's sockets where this jupyter_client and pyzmq can.
    if km.has_trait("transport_encryption"):
        import zmq

        if zmq.has("curve"):
            km.transport_encryption = "auto"
    return km


def error_line(exc):
    """Return the first line of an error message, for one-line reports."""
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(":") if lines else type(exc).__name__


def first_line(source):
    """The first non-blank line of a cell's source, cut to 72 characters."""
    for line in source.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= 72 else line[:69] + "..."
    return ""


def _cell_error(nb, index, exc):
    """Describe the exception `exc` raised while running cell `index`."""
    from nbclient.exceptions import (CellExecutionError, CellTimeoutError,
                                     DeadKernelError)

    if isinstance(exc, CellExecutionError):
        ename, evalue = exc.ename, exc.evalue
    elif isinstance(exc, CellTimeoutError):
        ename, evalue = "Timeout", (
            "the notebook's cells ran longer than the time limit; raise "
            "it with --timeout SECONDS")
    elif isinstance(exc, DeadKernelError):
        ename, evalue = "KernelDied", (
            "the kernel stopped (often: out of memory); try TLH_SMOKE=1 "
            "(--smoke) or close other notebooks")
    else:
        ename, evalue = type(exc).__name__, str(exc)
    lines = str(evalue).strip().splitlines()
    evalue = lines[0] if lines else ""
    if not 0 <= index < len(nb.cells):  # the kernel never ran a cell
        return CellError(cell=None, cells=len(nb.cells), first_line="",
                         ename=ename, evalue=evalue)
    return CellError(cell=index + 1, cells=len(nb.cells),
                     first_line=first_line(nb.cells[index].source),
                     ename=ename, evalue=evalue)


def check_timeout(timeout):
    """Refuse a time limit that is not a number of seconds >= 0."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds (the time a "
                         f"notebook's own cells may take in all; 0: no "
                         f"limit), got {timeout!r}")


def export_html(nb, path):
    """Render an executed notebook to a standalone HTML page at `path`."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    files.write_text(path, body)
    return Path(path)


def execute_notebook(path, out_dir, timeout=DEFAULT_TIMEOUT, env=None,
                     cwd=None, name=None, on_cell=None):
    """Run one notebook in a fresh kernel; write it executed, and as HTML.

    Args:
        path: the notebook to run.
        out_dir: folder for the executed `.ipynb` and its `.html`.
        timeout: seconds the notebook's own cells may take in all
            (None or 0: no limit).
        env: the kernel's environment (default: this process's).
        cwd: the kernel's working folder (default: the notebook's folder).
        name: file name of the outputs (default: the notebook's name).
        on_cell: called as on_cell(index, count) before each cell runs.

    Returns:
        NotebookResult with status "passed" or "failed".
    """
    import nbformat
    from nbclient import NotebookClient

    check_timeout(timeout)
    path = Path(path)
    out_dir = Path(out_dir)
    name = name or path.name
    nb = nbformat.read(path, as_version=4)
    cwd = Path(cwd) if cwd is not None else path.resolve().parent
    client = NotebookClient(
        nb, km=this_python_kernel(), timeout=None,
        allow_errors=False, record_timing=True,
        resources={"metadata": {"path": str(cwd)}})
    result = NotebookResult(name=name, source=path)
    index = -1
    start = time.perf_counter()
    try:
        with client.setup_kernel(env=env or kernel_env(),
                                 cleanup_kc=True):
            memory = PeakMemory(client.km.provisioner.pid)
            try:
                with memory:
                    info = client.wait_for_reply(client.kc.kernel_info())
                    if info and "language_info" in info["content"]:
                        nb.metadata["language_info"] = (
                            info["content"]["language_info"])
                    deadline = time.monotonic() + (timeout or math.inf)
                    for index, cell in enumerate(nb.cells):
                        if on_cell is not None:
                            on_cell(index, len(nb.cells))
                        if timeout:  # what is left of the notebook's time
                            client.timeout = max(
                                1, math.ceil(deadline - time.monotonic()))
                        client.execute_cell(
                            cell, index,
                            execution_count=client.code_cells_executed + 1)
                    client.set_widgets_metadata()
                result.status = "passed"
            finally:  # the last sample is taken when `with memory` ends
                result.peak_mem_mb = memory.peak_bytes / 2**20
    except Exception as exc:  # any failure is reported, not raised
        result.status = "failed"
        result.error = _cell_error(nb, index, exc)
    result.seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    result.ipynb = out_dir / name
    files.write_text(result.ipynb, nbformat.writes(nb))
    try:
        result.html = export_html(nb, out_dir / (Path(name).stem + ".html"))
    except Exception as exc:  # the run counts; a missing page is a warning
        result.html_error = error_line(exc)
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


def run_course(notebooks, out_dir, smoke=False, timeout=DEFAULT_TIMEOUT,
               keep_going=False, solutions=False, progress=True,
               environ=None):
    """Run notebooks in order, each in a fresh kernel; write an HTML build.

    Stops at the first failing notebook unless `keep_going`; the ones not
    run are listed as "not run". With `solutions`, each notebook runs with
    the reference answers filled in and in strict mode.

    Returns:
        Build: the results, the index page's path and the mode.
    """
    from tqdm.auto import tqdm

    from tlhelpers import config

    check_timeout(timeout)
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
    fill = solutions_filler() if solutions else None
    env = kernel_env(environ, smoke=smoke, solutions=solutions)
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
    try:
        for i, path in enumerate(notebooks):
            def on_cell(index, count, name=path.name):
                bar.set_postfix_str(f"{name} cell {index + 1}/{count}")

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
                        on_cell=on_cell)
            result.source = path
            build.results[i] = result
            bar.update(1)
            if result.status == "failed" and not keep_going:
                break
    finally:
        bar.close()
        write_index(build, _build_meta(mode))
    return build
