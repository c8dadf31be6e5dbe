"""How a course kernel runs: threads, OpenMP waiting, the allocator.

Every way of running the course (``setup()`` in a notebook, ``tlcourse
run``, the grader, Binder's ``start``) takes its runtime settings from
here, so that they are measured and changed in one place:

- threads: one per usable core (the cgroup CPU quota counts), at most
  ``MAX_THREADS``;
- OpenMP waiting: ``OMP_WAIT_POLICY=PASSIVE``, so a thread that waits for
  the others sleeps instead of spinning on a core another program needs
  (benchmarks/bench_contention.py measures it);
- the allocator (``ALLOCATOR``, glibc only): see bench_allocator.py for
  whether it is on.

Torch-free, so the command line imports it at once.
"""

import ctypes
import ctypes.util
import os
from pathlib import Path

MAX_THREADS = 4
WAIT_POLICY = "PASSIVE"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "NUMEXPR_MAX_THREADS")
# glibc malloc read at process start: blocks up to 32 MB come from the heap
# (not a fresh mmap each time), and up to 256 MB of freed heap is kept.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
             "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}
# Off: see benchmarks/bench_allocator.py for the figures behind the choice.
ALLOCATOR_ON = False
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


def tune_allocator(settings=None):
    """Apply ALLOCATOR to this running process (glibc); return success.

    A no-op returning False where the C library is not glibc.
    """
    settings = ALLOCATOR if settings is None else settings
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = True
    for key, option in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD),
                        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD)):
        if key in settings:
            done &= bool(mallopt(option, int(settings[key])))
    return done
