"""Run independent tasks on a Dask cluster, and never hang doing it.

The grader sends each notebook to a Dask worker as one task (``tlcourse
grade ... --dask ADDRESS``). This module is the part that knows Dask:
connecting (a scheduler's address, or ``local:N`` for a LocalCluster of N
worker processes on this machine), sending the tasks, retrying a failed
one once, and turning what still fails (an error, a lost worker, a task
past the whole run's deadline) into a per-task failure the caller turns
into a row. Results come back to the submitting process only.

Dask is an optional extra: ``pip install "tlhelpers[cluster]"``.
"""

import contextlib
import os
import time
from dataclasses import dataclass

LOCAL_PREFIX = "local:"
RETRIES = 1                   # one more try after an error or a lost worker


class ClusterError(RuntimeError):
    """Dask is missing or the cluster cannot be reached."""


@dataclass
class Outcome:
    """What became of one task: its value, or why there is none."""

    ok: bool
    value: object = None
    error: str = ""


def parse_address(text):
    """Return ("local", workers) or ("remote", address) for --dask."""
    text = str(text).strip()
    if text.startswith(LOCAL_PREFIX):
        count = text[len(LOCAL_PREFIX):]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--dask {text}: after 'local:' give the "
                             "number of workers, e.g. local:2")
        return "local", int(count)
    if not text or " " in text:
        raise ValueError(f"--dask {text!r}: give a scheduler address such "
                         "as tcp://10.0.0.5:8786, or local:N for N worker "
                         "processes on this machine")
    return "remote", text


@contextlib.contextmanager
def environ_kept():
    """Put os.environ back as it was, on the way out.

    A LocalCluster's nannies write Dask's pre-spawn variables
    (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...)
    into the environment of the process that starts them, so every kernel
    that process starts later would run on one thread.
    """
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _dask():
    try:
        from dask import config as dask_config
        from dask import distributed
    except ImportError as err:
        raise ClusterError(
            "grading on a cluster needs Dask: pip install "
            "'tlhelpers[cluster]' (dask and distributed)") from err
    return dask_config, distributed


def require_dask():
    """Raise ClusterError, saying what to install, if Dask is missing."""
    _dask()


@contextlib.contextmanager
def connect(address, connect_timeout=30):
    """Yield a Dask Client for `address` ("local:N" starts a cluster).

    A LocalCluster started here is closed on the way out, with its worker
    processes.
    """
    kind, where = parse_address(address)
    dask_config, distributed = _dask()
    # A task whose worker dies is retried once, then reported (not retried
    # forever on ever new workers).
    with dask_config.set({"distributed.scheduler.allowed-failures": RETRIES,
                          "distributed.comm.timeouts.connect":
                          f"{connect_timeout}s"}):
        if kind == "local":
            with environ_kept():
                cluster = distributed.LocalCluster(
                    n_workers=where, threads_per_worker=1, processes=True,
                    dashboard_address=None, host="127.0.0.1")
                try:
                    with distributed.Client(cluster) as client:
                        yield client
                finally:
                    cluster.close()
            return
        try:
            client = distributed.Client(where, timeout=connect_timeout)
        except OSError as err:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {where} ({err}); is "
                "it running (dask scheduler), and is the address right?"
            ) from err
        with client:
            yield client


def run_tasks(client, fn, items, deadline, on_done=None):
    """Run fn(item) for every item on the cluster; return Outcomes.

    Each task may be retried once (an error or a lost worker). Whatever
    is not finished `deadline` seconds after the start is cancelled and
    reported as such. Outcomes come in the order of `items`.

    Args:
        on_done: called as on_done(index, outcome) as each task ends.
    """
    _, distributed = _dask()
    futures = [client.submit(fn, item, retries=RETRIES, pure=False,
                             key=f"tlcourse-task-{i}-{time.time_ns()}")
               for i, item in enumerate(items)]
    index = {f.key: i for i, f in enumerate(futures)}
    outcomes = [None] * len(futures)
    waiting = distributed.as_completed(futures, with_results=False,
                                       timeout=max(1.0, deadline))
    try:
        for future in waiting:
            i = index[future.key]
            try:
                outcomes[i] = Outcome(True, future.result())
            except Exception as err:  # the task's error, or a lost worker
                outcomes[i] = Outcome(False, error=_describe(err))
            if on_done is not None:
                on_done(i, outcomes[i])
    except distributed.TimeoutError:
        pass
    finally:
        pending = [f for f, o in zip(futures, outcomes) if o is None]
        if pending:
            client.cancel(pending, force=True)
    for i, outcome in enumerate(outcomes):
        if outcome is None:
            outcomes[i] = Outcome(False, error=(
                f"not finished within the run's deadline of {deadline:g} "
                "s (cancelled)"))
            if on_done is not None:
                on_done(i, outcomes[i])
    return outcomes


def _describe(err):
    name = type(err).__name__
    if name == "KilledWorker":
        return ("the Dask worker running it was lost twice (killed, out "
                "of memory, or disconnected)")
    return f"{name}: {err}"
