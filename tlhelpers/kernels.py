"""How a course kernel runs: threads, OpenMP waiting, the allocator.

Every way of running the course (``setup()`` in a notebook, ``tlcourse
run``, the grader, Binder's ``start``) takes its runtime settings from
here, so that they are measured and changed in one place:

- threads: one per usable core (the cgroup CPU quota counts), at most
  ``MAX_THREADS``, for a kernel that runs alone; kernels that run side by
  side share the cores (``jobs_threads``). benchmarks/bench_threads.py,
  Lite0 at batch 16 on 2 cores, images per second with one thread, two,
  and two one-thread processes at once: training at 48 px 81, 64, 140;
  64 px 69, 56, 105; 96 px 32, 38, 71; 128 px 20, 31, 43; 224 px 7.5,
  9.5, 15; inference at batch 64, 64 px 456, 469, 787; 128 px 56, 79,
  115. Two threads help one kernel from 96 px up (full mode) and hurt
  below (SMOKE mode); two kernels side by side always do more;
- OpenMP waiting: ``OMP_WAIT_POLICY=PASSIVE``, so a thread that waits for
  the others sleeps instead of spinning on a core another program needs.
  benchmarks/bench_contention.py, notebook 03 in SMOKE mode on 2 cores,
  quiet and beside one busy process: OpenMP's default spinning 90.5 s and
  729.3 s (8.1x); passive 72.8 s and 67.8 s (0.93x); one thread 51.6 s
  and 49.7 s;
- the allocator (``ALLOCATOR``, glibc only): large blocks from the heap
  instead of fresh pages from the OS each time; on, see ALLOCATOR_ON.

It is also the one place that runs a notebook in a kernel, for ``tlcourse
run`` (runner) and the grader (grading) alike: ``kernel_manager`` starts
ipykernel in this Python (inside a sandbox's command line if given),
``run_notebook`` executes the cells under one time budget for the
notebook's own cells, ``MemorySampler`` follows the kernel's resident
memory (``HeapSampler``, its malloc'd bytes, serves
``strategies.compare_strategies``), ``Watchdog``
kills a kernel past its memory or a cell past its interrupt, and
``CellError`` says in one line where and why a notebook stopped.

Torch-free, so the command line imports it at once; nbclient and
jupyter_client are imported when a notebook runs.
"""

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import os
import sys
import threading
import time
from pathlib import Path

import psutil

MAX_THREADS = 4
# Seconds a notebook's own cells may take in all, in `tlcourse run` and in
# `tlcourse grade` alike (0: no limit).
NOTEBOOK_TIMEOUT = 900
STARTUP_TIMEOUT = 60         # seconds for a kernel to start
WAIT_POLICY = "PASSIVE"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "NUMEXPR_MAX_THREADS")
# glibc malloc read at process start: blocks up to 32 MB come from the heap
# (not a fresh mmap each time), and up to 256 MB of freed heap is kept.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
             "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}
# On, by benchmarks/bench_allocator.py (Lite0, 2 threads, medians of 5
# alternating runs, tuned/default throughput): inference x1.55 and x1.52
# at batch 16 (96 and 128 px), x1.38 and x1.04 at batch 64; training x1.04
# and x1.03 at batch 16, x1.03 at batch 64 and 96 px; peak memory at most
# x1.04. (Training at batch 64 and 128 px was not measured on a quiet
# machine.)
ALLOCATOR_ON = True
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def cgroup_cpus(root="/sys/fs/cgroup"):
    """Return the container's CPU quota in cores (e.g. 2.0), or None."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(root="/sys/fs/cgroup"):
    """Return how many CPU cores this process may really use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpus(root)
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return cores


def default_threads():
    """Return the thread count course kernels use by default."""
    return min(MAX_THREADS, usable_cores())


def default_jobs(memory_mb, limit=4):
    """Return how many kernels to run at once: one per usable core, as
    many as `memory_mb` each fits in the memory available, `limit` at
    most (benchmarks/bench_threads.py: two one-thread kernels do more
    work than one two-thread kernel)."""
    fit = psutil.virtual_memory().available // (int(memory_mb) * 2**20)
    return max(1, min(limit, usable_cores(), fit))


def jobs_threads(jobs):
    """Return the threads each of `jobs` kernels running at once gets."""
    return max(1, usable_cores() // max(1, int(jobs)))


def thread_env(threads=None, wait_policy=WAIT_POLICY):
    """Return the environment variables that set threads and waiting."""
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    env = {name: str(threads) for name in THREAD_VARIABLES}
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    return env


def runtime_env(threads=None):
    """Return the variables a course kernel starts with (threads, waiting,
    and the allocator where ALLOCATOR_ON)."""
    env = thread_env(threads)
    if ALLOCATOR_ON:
        env.update(ALLOCATOR)
    return env


@functools.lru_cache(maxsize=None)
def _libc_function(name):
    """Return a function of the C library by name, or None where absent."""
    library = ctypes.util.find_library("c")
    if not library:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(field, ctypes.c_size_t) for field in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
        "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use():
    """Return the bytes this process holds from malloc now, or None.

    glibc (2.33 and later) only: the bytes in use in its arenas plus its
    mmapped blocks. Unlike the resident set size, this does not count
    memory malloc keeps after a free (the tuned allocator keeps up to
    MALLOC_TRIM_THRESHOLD_), so a block that reuses it still counts.
    """
    mallinfo2 = _libc_function("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def tune_allocator(settings=None):
    """Apply ALLOCATOR to this running process (glibc); return success.

    A no-op returning False where the C library is not glibc.
    """
    settings = ALLOCATOR if settings is None else settings
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    done = True
    for key, option in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD),
                        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD)):
        if key in settings:
            done &= bool(mallopt(option, int(settings[key])))
    return done


def apply_in_process(environ=None):
    """Apply what can still change in a running kernel; return a summary.

    ``setup()`` calls it: torch's thread count follows ``default_threads``
    unless OMP_NUM_THREADS was set, and the allocator is tuned where
    ALLOCATOR_ON. OpenMP's wait policy is read when torch loads, so only a
    kernel started with it (``tlcourse run``, the grader, Binder, or the
    kernel ``tlcourse kernel install`` adds) has it; ``passive`` says
    whether this one does.
    """
    import torch

    env = os.environ if environ is None else environ
    if not env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())
    tuned = tune_allocator() if ALLOCATOR_ON else False
    return {"threads": torch.get_num_threads(), "allocator": tuned,
            "passive": env.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"}


def shell_exports(environ=None, threads=None):
    """Return ``export NAME=value`` lines for the runtime settings that the
    environment does not set yet (for shell scripts such as Binder's
    ``start``)."""
    env = os.environ if environ is None else environ
    lines = []
    for key, value in runtime_env(threads).items():
        if not env.get(key):
            lines.append(f"export {key}={value}")
    return "\n".join(lines)


KERNEL_NAME = "tlcourse"
KERNEL_DISPLAY_NAME = "Python 3 (transfer-learning course)"


def install_kernel_spec(user=True, prefix=None, threads=None):
    """Install a Jupyter kernel that starts with the course's settings.

    The kernel is the ordinary IPython one with runtime_env() in its
    environment, so a learner's own ``jupyter lab`` gets the same threads,
    OpenMP waiting and allocator as ``tlcourse run``. Returns the folder
    the kernel spec was written to.
    """
    from ipykernel import kernelspec

    return kernelspec.install(user=user, prefix=prefix,
                              kernel_name=KERNEL_NAME,
                              display_name=KERNEL_DISPLAY_NAME,
                              env=runtime_env(threads))


# ---------------------------------------------------------------- limits


def limit_memory(memory_mb, address_slack_mb):
    """Cap this process's memory; the kernel it starts inherits the cap.

    RLIMIT_DATA is `memory_mb`; RLIMIT_AS adds `address_slack_mb` for the
    address space torch reserves but never uses. Where a system refuses a
    limit (macOS) or has none (Windows), a Watchdog alone limits memory.
    """
    try:
        import resource
    except ImportError:  # Windows
        return
    limit = int(memory_mb) * 2**20
    for name, value in (("RLIMIT_DATA", limit),
                        ("RLIMIT_AS", limit + int(address_slack_mb) * 2**20)):
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def adopt_orphans():
    """Make orphaned descendants (daemons) children of this process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def die_with_parent():
    """In a child process: be killed when the thread that started it ends.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing happens.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)   # SIGKILL
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------ processes, memory


def start_time(pid):
    """Return a process's start time (to recognise it later), or None."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def kill_tree(pid, started=None):
    """Kill a process and everything it started.

    With ``started`` (from start_time), only if the process with that pid
    is still the one that started then: a pid can be reused.
    """
    try:
        parent = psutil.Process(pid)
        if started is not None and parent.create_time() != started:
            return
        procs = parent.children(recursive=True) + [parent]
    except psutil.Error:
        return
    _kill(procs)


def kill_children():
    """Kill every process this one started (whatever a kernel left)."""
    _kill(psutil.Process().children(recursive=True))


def _kill(procs):
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def tree_rss(pid, children=True):
    """Resident memory of a process (and its children), in bytes.

    None when the process is gone; children that exit while being
    measured are skipped.
    """
    try:
        proc = psutil.Process(pid)
        rss = proc.memory_info().rss
        kids = proc.children(recursive=True) if children else []
    except psutil.Error:
        return None
    for child in kids:
        try:
            rss += child.memory_info().rss
        except psutil.Error:
            pass
    return rss


def _read_hwm(pid):
    """Return a process's peak RSS from Linux's VmHWM, or 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemorySampler:
    """Follow a process's resident memory from a background thread.

    Every `interval` seconds it measures the process (with its children,
    unless `children` is False, plus what `extra(pid)` adds) and keeps the
    peak. With `high_water`, Linux's own high-water mark (VmHWM) counts as
    well, so a spike between two samples is not missed; it is the peak
    since the process started, so leave it off to measure the growth of
    a block of code (`growth_bytes`). `pid` may be set after creation
    (a kernel's pid is known once it starts). Use as a context manager,
    or start() and stop().
    """

    def __init__(self, pid=None, interval=0.05, children=True,
                 high_water=True, extra=None):
        self.pid = pid
        self.interval = interval
        self.children = children
        self.high_water = high_water
        self.extra = extra
        self.base_bytes = None
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @property
    def growth_bytes(self):
        """Return the peak above the first sample, in bytes."""
        return max(0, self.peak_bytes - (self.base_bytes or 0))

    def measure(self):
        """Return the memory in use now, in bytes (None: no process)."""
        if self.pid is None:
            return None
        used = tree_rss(self.pid, self.children)
        if used is not None and self.extra is not None:
            used += self.extra(self.pid)
        return used

    def sample(self):
        """Measure once now, update the peak and return the measurement."""
        used = self.measure()
        if used is None:
            return None
        if self.base_bytes is None:
            self.base_bytes = used
        high = _read_hwm(self.pid) if self.high_water else 0
        self.peak_bytes = max(self.peak_bytes, used, high)
        self.check(used)
        return used

    def watch(self, pid):
        """Follow the process `pid` (a kernel that just started)."""
        self.pid = pid

    def check(self, used):
        """Act on a measurement (a Watchdog kills; a sampler only keeps)."""

    def cell_started(self, seconds):
        """Note that a cell with `seconds` to run (None: no limit) began."""

    def cell_done(self):
        """Note that the running cell ended."""

    def _poll(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self):
        """Sample once now, then every `interval` seconds until stopped."""
        self.sample()
        self._thread.start()
        return self

    def stop(self):
        """Stop sampling, after one last sample."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


class HeapSampler(MemorySampler):
    """A MemorySampler of this process's malloc'd bytes (heap_in_use).

    For the growth of a block of code in this process: resident memory
    misses a block that reuses memory malloc kept from an earlier free.
    Where heap_in_use is unavailable (not glibc) it measures resident
    memory like MemorySampler.
    """

    def __init__(self, interval=0.005):
        super().__init__(os.getpid(), interval=interval, children=False,
                         high_water=False)
        self.heap = heap_in_use() is not None

    def measure(self):
        """Return the bytes in use now (malloc'd, else resident)."""
        return heap_in_use() if self.heap else super().measure()


class Watchdog(MemorySampler):
    """Kill a kernel past its memory, or a cell that ignores its interrupt.

    A cell's deadline is its time limit plus `grace` seconds (to obey the
    interrupt it gets at the limit); `reason` says why the kernel was
    killed: "memory" or "timeout" (None: it was not).
    """

    def __init__(self, limit_bytes, grace=10, interval=0.2, extra=None):
        super().__init__(interval=interval, high_water=False, extra=extra)
        self.limit_bytes = limit_bytes
        self.grace = grace
        self.started = None
        self.deadline = None
        self.reason = None

    def watch(self, pid):
        """Watch the process `pid` (a kernel that just started)."""
        self.started, self.pid = start_time(pid), pid

    def cell_started(self, seconds):
        """Set the deadline of the cell that began (None: no limit)."""
        self.deadline = (None if seconds is None
                         else time.monotonic() + seconds + self.grace)

    def cell_done(self):
        """Clear the deadline of the cell that ended."""
        self.deadline = None

    def check(self, used):
        """Kill the kernel past its memory limit or its cell's deadline."""
        if self.reason is not None:
            return
        if used > self.limit_bytes:
            self.reason = "memory"
        elif self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "timeout"
        if self.reason is not None:
            kill_tree(self.pid, self.started)

    def stop(self):
        """Stop watching."""
        self._stop.set()


# --------------------------------------------------------- running cells


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


def cell_error(nb, index, exc):
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


def seconds_argument(text):
    """Read a command line's time limit: seconds >= 0 (0: no limit)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"must be >= 0 seconds (0: no limit), got {text}")
    return value


def jobs_argument(text):
    """Read a command line's --jobs: notebooks at once, a whole number >= 1."""
    import argparse

    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of notebooks: give a whole number, "
            "1 or more")
    return jobs


def kernel_manager(wrapper=(), ipc_folder=None, encrypt=True):
    """Return a kernel manager that starts ipykernel in this Python.

    A `python3` kernel spec found first on the Jupyter path may belong to
    another Python (one without tlhelpers); the course runs in the
    environment tlhelpers is installed in. `wrapper`: a command line the
    kernel's runs inside (a sandbox). `ipc_folder`: talk over IPC sockets
    there instead of TCP (a sandbox has no network). `encrypt`: encrypt
    the sockets where this jupyter_client and pyzmq can.
    """
    from ipykernel.kernelspec import get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec = get_kernel_dict()
    spec["argv"] = list(wrapper) + spec["argv"]
    kernel_spec = KernelSpec(resource_dir="", interrupt_mode="message",
                             **spec)

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return kernel_spec

    km = AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=ThisPython())
    if ipc_folder is not None:
        km.transport = "ipc"
        km.ip = str(Path(ipc_folder) / "kernel")
        km.connection_file = str(Path(ipc_folder) / "kernel.json")
    if encrypt and km.has_trait("transport_encryption"):
        import zmq

        if zmq.has("curve"):
            km.transport_encryption = "auto"
    return km


@dataclasses.dataclass
class KernelRun:
    """What happened while a notebook ran: what stopped it, and where.

    ``error`` is the exception that ended the run early (None: every cell
    ran); ``index`` the cell running then (-1: none yet); ``timed_out``
    the cells that reached their time limit; ``skipped`` the notebook's
    own code cells not run because its time was spent.
    """

    error: BaseException | None = None
    index: int = -1
    timed_out: set = dataclasses.field(default_factory=set)
    skipped: list = dataclasses.field(default_factory=list)


def run_notebook(nb, km, env, cwd, timeout=None, allow_errors=False,
                 interrupt_on_timeout=False, memory=None, extra=None,
                 extra_timeout=None, on_cell=None, on_executed=None,
                 record_timing=True, shutdown="graceful"):
    """Run a notebook's cells in a new kernel; return a KernelRun.

    The notebook's own cells share `timeout` seconds in all (None or 0:
    no limit): each cell may take what is left, and once it is spent the
    remaining code cells are skipped. Cells that `extra(cell)` picks (the
    grader's) have `extra_timeout` seconds each, outside that budget.

    Args:
        nb: the notebook (nbformat), executed in place.
        km: its kernel manager (see kernel_manager).
        env: the kernel's whole environment.
        cwd: the kernel's working folder.
        allow_errors: run on after a cell's error (its traceback stays in
            the cell's outputs) instead of stopping there.
        interrupt_on_timeout: interrupt a cell at its limit and run on,
            instead of stopping there.
        memory: a MemorySampler (or Watchdog) that follows the kernel from
            its start; it is told when each cell starts and ends.
        on_cell: called as on_cell(index, count) before each cell.
        on_executed: called as on_executed(cell, index, timed_out) after
            each code cell that ran (timed_out: it reached its limit).
        shutdown: "graceful" (ask the kernel to stop, then kill it) or
            "immediate" (kill it) once the cells have run.
    """
    run = KernelRun()
    budget = {"left": timeout or None, "start": None, "allotted": None}
    extra = extra or (lambda cell: False)
    client = _client_class()(
        nb, run, budget, extra, on_cell, km=km,
        timeout_func=lambda cell: _allot(cell, budget, extra,
                                         extra_timeout, memory),
        allow_errors=allow_errors,
        interrupt_on_timeout=interrupt_on_timeout,
        startup_timeout=STARTUP_TIMEOUT, record_timing=record_timing,
        shutdown_kernel=shutdown,
        resources={"metadata": {"path": str(cwd)}},
        on_notebook_start=lambda notebook: _watch(memory, client),
        on_cell_executed=lambda cell, cell_index, execute_reply=None:
            _spent(cell, cell_index, run, budget, extra, memory,
                   on_executed))
    try:
        client.execute(env=dict(env), cleanup_kc=True)
    except Exception as exc:  # reported, not raised: see run.error
        run.error = exc
    finally:
        if memory is not None:
            memory.stop()
    return run


def _allot(cell, budget, extra, extra_timeout, memory):
    """Return a code cell's time limit in seconds (None: no limit)."""
    if extra(cell):
        allotted = extra_timeout
    elif budget["left"] is None:
        allotted = None
    else:
        allotted = max(1, math.ceil(budget["left"]))
    budget["start"], budget["allotted"] = time.monotonic(), allotted
    if memory is not None:
        memory.cell_started(allotted)
    return allotted


def _spent(cell, index, run, budget, extra, memory, on_executed):
    """Charge a cell's time to the budget; note a cell that timed out."""
    if budget["start"] is not None:
        spent = time.monotonic() - budget["start"]
        if not extra(cell) and budget["left"] is not None:
            budget["left"] -= spent
        if budget["allotted"] is not None and spent >= budget["allotted"]:
            run.timed_out.add(index)
        budget["start"] = None
    if memory is not None:
        memory.cell_done()
        memory.sample()
    if on_executed is not None:
        on_executed(cell, index, index in run.timed_out)


def _watch(memory, client):
    """Start following the kernel's memory, now that it runs."""
    if memory is not None:
        memory.watch(client.km.provisioner.pid)
        memory.start()


def _client_class():
    """Return the NotebookClient that run_notebook uses (nbclient loads
    only when a notebook runs)."""
    from nbclient import NotebookClient

    class CourseClient(NotebookClient):
        def __init__(self, nb, run, budget, extra, on_cell, **kwargs):
            super().__init__(nb, **kwargs)
            self._run, self._budget, self._extra = run, budget, extra
            self._on_cell = on_cell

        async def async_execute_cell(self, cell, cell_index,
                                     execution_count=None,
                                     store_history=True):
            self._run.index = cell_index
            if self._on_cell is not None:
                self._on_cell(cell_index, len(self.nb.cells))
            left = self._budget["left"]
            if (cell.cell_type == "code" and not self._extra(cell)
                    and left is not None and left <= 0):
                self._run.skipped.append(cell_index)
                return cell
            return await super().async_execute_cell(
                cell, cell_index, execution_count, store_history)

    return CourseClient


if __name__ == "__main__":  # python -m tlhelpers.kernels: shell exports
    print(shell_exports())
