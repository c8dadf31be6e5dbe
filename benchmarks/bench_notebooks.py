"""Time every course notebook and measure its kernel's peak memory.

Runs the notebooks one after another, each in a fresh kernel (as
`tlcourse run` does), and prints each one's wall time and peak resident
memory against the course budgets, with the ratios:

    python benchmarks/bench_notebooks.py            # SMOKE mode (CI)
    python benchmarks/bench_notebooks.py --full     # what a learner gets
    python benchmarks/bench_notebooks.py --load     # beside a busy program
    python benchmarks/bench_notebooks.py --rev REV  # the course at REV
    python benchmarks/bench_notebooks.py --jobs 2   # two at a time

--jobs N runs N notebooks at once, each kernel with its share of the cores
(as `tlcourse run` does by default); the total is then the wall time of
the whole run, not the sum of the notebooks' times.

--load runs one CPU-bound process (a busy loop) beside the notebooks, as a
learner's busy laptop or a shared classroom server would. --rev REV runs
the notebooks and tlhelpers of an earlier git revision (checked out into a
temporary worktree), for before/after figures from one machine.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlhelpers import runner

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {  # mode: (seconds per notebook, MiB per kernel, seconds total)
    "smoke": (90, 1536, 360),
    "full": (600, 1536, None),
}


def main(argv=None):
    """Run the notebooks and print the measured figures against budgets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="full mode instead of SMOKE")
    parser.add_argument("--solutions", action="store_true",
                        help="run with the reference solutions filled in")
    parser.add_argument("--load", action="store_true",
                        help="run one CPU-bound process beside them")
    parser.add_argument("--rev", metavar="REV",
                        help="measure the course at this git revision")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at once (default 1: each alone)")
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    mode = "full" if args.full else "smoke"
    per_nb, per_mem, total_budget = BUDGETS[mode]
    with contextlib.ExitStack() as stack:
        root, environ = ROOT, None
        if args.rev:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            root = root / "course"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add",
                            "--detach", "-q", str(root), args.rev],
                           check=True)
            stack.callback(subprocess.run, ["git", "-C", str(ROOT),
                           "worktree", "remove", "--force", str(root)])
            # The kernels import that revision's tlhelpers.
            environ = dict(os.environ, PYTHONPATH=str(root))
        notebooks = ([root / "notebooks" / p.name for p in args.notebooks]
                     or runner.course_notebooks(root))
        if args.load:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            stack.callback(hog.wait)
            stack.callback(hog.kill)
        out = stack.enter_context(tempfile.TemporaryDirectory())
        start = time.perf_counter()
        build = runner.run_course(notebooks, out, smoke=not args.full,
                                  keep_going=True, progress=False,
                                  solutions=args.solutions, timeout=3600,
                                  environ=environ, jobs=args.jobs)
        wall = time.perf_counter() - start
    load = "beside a busy process" if args.load else "quiet"
    rev = args.rev or "working tree"
    print(f"mode: {build.mode}; {load}; revision {rev}; {args.jobs} at a "
          f"time; budgets: {per_nb} s and {per_mem} MiB per notebook")
    print(f"{'notebook':32s} {'status':7s} {'seconds':>8s} {'x budget':>9s}"
          f" {'peak MiB':>9s} {'x budget':>9s}")
    ok = build.ok
    for r in build.results:
        t_ratio = r.seconds / per_nb
        m_ratio = r.peak_mem_mb / per_mem
        ok &= t_ratio <= 1 and m_ratio <= 1
        print(f"{r.name:32s} {r.status:7s} {r.seconds:8.1f} {t_ratio:9.2f}"
              f" {r.peak_mem_mb:9.0f} {m_ratio:9.2f}")
    total = sum(r.seconds for r in build.results)
    if args.jobs > 1:  # side by side: the run's wall time is the total
        print(f"sum of the notebooks' times {total:.1f} s, "
              f"{args.jobs} at a time")
        total = wall
    line = f"total {total:.1f} s"
    if total_budget:
        line += f" (budget {total_budget} s, x{total / total_budget:.2f})"
        ok &= total <= total_budget
    print(line)
    print("within budgets" if ok else "OVER BUDGET or failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
