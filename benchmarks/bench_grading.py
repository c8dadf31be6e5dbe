"""Time grading with the sandbox on against off; find the memory minimum.

Grades the original fixture set (tests/fixtures/submissions: the eleven
submissions from before the sandbox, in SMOKE mode, as the tests do) with
each kernel sandboxed by bubblewrap and without, alternating, in one run,
and prints both times and their ratio (target: at most 1.3):

    python benchmarks/bench_grading.py              # one round each
    python benchmarks/bench_grading.py --rounds 2   # on/off/on/off...

``--cluster`` instead measures grading throughput, in notebooks per
minute, on the same fixtures: here with ``--jobs 2`` against a Dask
LocalCluster of 2 workers (``--dask local:2``), alternating, sandboxed,
in one run, with the ratio (target: the cluster at least 0.8x the local
rate), and projects a 300-learner cohort (7 notebooks each) on N = 2, 16
and 64 workers from the measured time per notebook:

    python benchmarks/bench_grading.py --cluster

``--memory`` instead runs the capstone's reference solution (the
heaviest exercise: ImageNet weights and two training phases) under each
RLIMIT_DATA in MB and says which pass, to set grading.MIN_MEMORY_MB:

    python benchmarks/bench_grading.py --memory 1024 1280 1536 2048
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from tlhelpers import grading

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "submissions"
ORIGINAL = ["alice", "bob", "broken.ipynb", "carol", "dave", "frank",
            "grace", "kim", "lee", "mallory", "other_course.ipynb"]
TARGET = 1.3
CLUSTER_TARGET = 0.8          # cluster rate / local rate, at least
COHORT = (300, 7)             # learners, notebooks each
PROJECT_WORKERS = (2, 16, 64)
PROBE = """\
import sys
from tlhelpers.grading import AS_ALLOWANCE_MB
from tlhelpers.kernels import limit_memory
limit_memory(int(sys.argv[1]), AS_ALLOWANCE_MB)
try:
    import ipykernel.kernelapp
    from tlhelpers import exercises
    namespace = {}
    exec(exercises.capstone.solution_code, namespace)
    result = exercises.capstone.check(namespace["final_model"])
    print(result.status, "|", result.message)
except MemoryError as err:
    print("MemoryError |", err)
"""


def time_grading(sandbox, jobs, timeout, dask=None, book_out=None):
    """Grade the original fixtures once; return (seconds, statuses)."""
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-sandbox warning
        start = time.perf_counter()
        book = grading.grade([FIXTURES / name for name in ORIGINAL],
                             out=Path(out) / "gradebook.csv",
                             timeout=timeout,
                             memory_mb=grading.MIN_MEMORY_MB, jobs=jobs,
                             seed=5, progress=False, sandbox=sandbox,
                             dask=dask)
        seconds = time.perf_counter() - start
        if book_out is not None:
            book_out.append(book)
    return seconds, [(r.file, r.status, r.total) for r in book.rows]


def cluster_throughput(rounds, timeout):
    """Print local --jobs 2 against --dask local:2, and a projection."""
    times = {"local": [], "cluster": []}
    outcomes, books = {}, []
    for _ in range(rounds):
        for how in ("local", "cluster"):
            seconds, rows = time_grading(
                True, 2, timeout, dask="local:2" if how == "cluster"
                else None, book_out=books)
            times[how].append(seconds)
            outcomes[how] = rows
            print(f"{how:8s}: {seconds:7.1f} s", flush=True)
    count = len(outcomes["local"])
    rate = {how: 60 * count * rounds / sum(t) for how, t in times.items()}
    ratio = rate["cluster"] / rate["local"]
    # The time one notebook occupies a worker: its run, from the rows of
    # every graded notebook that started a kernel, in all runs.
    ran = [r.seconds for b in books for r in b.rows
           if r.status not in ("invalid notebook", "not this course")]
    per_notebook = sum(ran) / len(ran)
    print(f"{count} fixture submissions ({len(ran) // len(books)} run a "
          f"kernel), {rounds} round(s), SMOKE mode, sandboxed, "
          f"--timeout {timeout:g}")
    print(f"{'':24s} {'seconds':>9s} {'notebooks/min':>14s}")
    print(f"{'local --jobs 2':24s} {sum(times['local']):9.1f} "
          f"{rate['local']:14.2f}")
    print(f"{'--dask local:2':24s} {sum(times['cluster']):9.1f} "
          f"{rate['cluster']:14.2f}")
    print(f"ratio cluster/local {ratio:9.2f}  (target >= {CLUSTER_TARGET})")
    same = outcomes["local"] == outcomes["cluster"]
    print("same gradebook rows both ways" if same
          else f"ROWS DIFFER: {outcomes}")
    learners, each = COHORT
    total = learners * each
    print(f"\nprojection: {learners} learners x {each} notebooks = {total}"
          f" notebooks at the measured {per_notebook:.1f} s per notebook "
          f"(a worker per notebook at a time; the cluster's measured "
          f"overhead {1 / ratio:.2f}x included)")
    for workers in PROJECT_WORKERS:
        hours = total * per_notebook / workers / ratio / 3600
        print(f"  {workers:3d} workers: {hours:7.2f} h")
    return 0 if ratio >= CLUSTER_TARGET and same else 1


def memory_probe(sizes):
    """Run the capstone solution under each memory limit; print results."""
    env = dict(os.environ, TLH_SMOKE="1", OMP_NUM_THREADS="1")
    for mb in sizes:
        out = subprocess.run([sys.executable, "-c", PROBE, str(mb)],
                             capture_output=True, text=True, env=env)
        lines = [ln for ln in out.stdout.splitlines() if " | " in ln]
        print(f"RLIMIT_DATA {mb:5d} MB: "
              f"{lines[-1] if lines else out.stderr.strip()[-200:]}")


def main(argv=None):
    """Print grading times with the sandbox on and off, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--memory", type=int, nargs="+", metavar="MB",
                        help="probe these memory limits instead")
    parser.add_argument("--cluster", action="store_true",
                        help="local --jobs 2 against --dask local:2")
    args = parser.parse_args(argv)
    if args.memory:
        memory_probe(args.memory)
        return 0
    problem = grading.sandbox_problem()
    if problem:
        print(f"no sandbox here: {problem}")
        return 1
    os.environ["TLH_SMOKE"] = "1"
    if args.cluster:
        # The default kill grace both ways: a Dask worker process imports
        # the grader afresh, so a value set here would not reach it.
        return cluster_throughput(args.rounds, args.timeout)
    grading.KILL_GRACE = 3  # as the tests
    times = {True: [], False: []}
    outcomes = {}
    for _ in range(args.rounds):
        for sandbox in (False, True):
            seconds, rows = time_grading(sandbox, args.jobs, args.timeout)
            times[sandbox].append(seconds)
            outcomes[sandbox] = rows
            print(f"sandbox {'on ' if sandbox else 'off'}: {seconds:7.1f} s")
    on, off = sum(times[True]), sum(times[False])
    ratio = on / off
    print(f"{len(ORIGINAL)} fixture submissions, {args.rounds} round(s), "
          f"--jobs {args.jobs}, --timeout {args.timeout:g}, SMOKE mode")
    print(f"{'':12s} {'seconds':>9s}")
    print(f"{'sandbox off':12s} {off:9.1f}")
    print(f"{'sandbox on':12s} {on:9.1f}")
    print(f"ratio on/off {ratio:9.2f}  (target <= {TARGET})")
    same = outcomes[True] == outcomes[False]
    print("same gradebook rows both ways" if same
          else f"ROWS DIFFER: {outcomes}")
    return 0 if ratio <= TARGET and same else 1


if __name__ == "__main__":
    sys.exit(main())
