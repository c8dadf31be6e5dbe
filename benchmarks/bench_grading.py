"""Time grading with the sandbox on against off; find the memory minimum.

Grades the original fixture set (tests/fixtures/submissions: the eleven
submissions from before the sandbox, in SMOKE mode, as the tests do) with
each kernel sandboxed by bubblewrap and without, alternating, in one run,
and prints both times and their ratio (target: at most 1.3):

    python benchmarks/bench_grading.py              # one round each
    python benchmarks/bench_grading.py --rounds 2   # on/off/on/off...

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
PROBE = """\
import sys
from tlhelpers.grading import _limit_memory
_limit_memory(int(sys.argv[1]))
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


def time_grading(sandbox, jobs, timeout):
    """Grade the original fixtures once; return (seconds, statuses)."""
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-sandbox warning
        start = time.perf_counter()
        book = grading.grade([FIXTURES / name for name in ORIGINAL],
                             out=Path(out) / "gradebook.csv",
                             timeout=timeout,
                             memory_mb=grading.MIN_MEMORY_MB, jobs=jobs,
                             seed=5, progress=False, sandbox=sandbox)
        seconds = time.perf_counter() - start
    return seconds, [(r.file, r.status, r.total) for r in book.rows]


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
    args = parser.parse_args(argv)
    if args.memory:
        memory_probe(args.memory)
        return 0
    problem = grading.sandbox_problem()
    if problem:
        print(f"no sandbox here: {problem}")
        return 1
    os.environ["TLH_SMOKE"] = "1"
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
