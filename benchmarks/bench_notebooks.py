"""Time every course notebook and measure its kernel's peak memory.

Runs the notebooks one after another, each in a fresh kernel (as
`tlcourse run` does), and prints each one's wall time and peak resident
memory against the course budgets, with the ratios:

    python benchmarks/bench_notebooks.py            # SMOKE mode (CI)
    python benchmarks/bench_notebooks.py --full     # what a learner gets
    python benchmarks/bench_notebooks.py --load     # beside a busy program
    python benchmarks/bench_notebooks.py --rev REV  # the course at REV
    python benchmarks/bench_notebooks.py --jobs 2   # two at a time
    python benchmarks/bench_notebooks.py --timeout 600  # cap each one
    python benchmarks/bench_notebooks.py --against REV  # REV beside today

--jobs N runs N notebooks at once, each kernel with its share of the cores
(as `tlcourse run` does by default); the total is then the wall time of
the whole run, not the sum of the notebooks' times.

--load runs one CPU-bound process (a busy loop) beside the notebooks, as a
learner's busy laptop or a shared classroom server would. --rev REV runs
the notebooks and tlhelpers of an earlier git revision (checked out into a
temporary worktree), for before/after figures from one machine. Its
kernels start without the thread, OpenMP wait-policy and allocator
variables that `kernels.runtime_env` adds today, as the course's runner
started kernels before those settings existed (revision 1b1b99d^).
--timeout S stops a notebook whose cells have run S seconds in all; its
time is then printed as a lower bound (">=") and it counts as over
budget. Use it for arms that would otherwise run for hours, such as an
old revision beside a busy process.

--against REV runs each notebook twice in a row, at REV (as --rev does)
and in the working tree, and prints the two side by side with their
ratio: the fairest before/after on a shared machine, whose speed drifts
over an hour. The order alternates from one notebook to the next. With
--stop-at X, today's run goes first and REV's run of that notebook is
stopped once it has taken X times as long (its ratio is then ">= X").
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from tlhelpers import kernels, runner

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
    parser.add_argument("--timeout", type=kernels.seconds_argument,
                        default=3600, metavar="S",
                        help="seconds each notebook may run (default "
                             "3600; 0: no limit)")
    parser.add_argument("--against", metavar="REV",
                        help="run each notebook at REV and today, side by "
                             "side")
    parser.add_argument("--stop-at", type=float, metavar="X",
                        help="with --against: stop REV's run of a notebook "
                             "at X times today's time")
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.against and (args.rev or args.jobs != 1):
        parser.error("--against runs one notebook at a time against the "
                     "working tree: drop --rev and --jobs")
    if args.stop_at is not None and (not args.against or args.stop_at <= 1):
        parser.error("--stop-at X needs --against and X > 1")
    mode = "full" if args.full else "smoke"
    per_nb, per_mem, total_budget = BUDGETS[mode]
    with contextlib.ExitStack() as stack:
        root, environ = ROOT, None
        if args.rev:
            root = checkout(stack, args.rev)
            environ = stack.enter_context(as_of(root))
        if args.load:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            stack.callback(hog.wait)
            stack.callback(hog.kill)
        out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.against:
            return compare(args, checkout(stack, args.against), out)
        notebooks = ([root / "notebooks" / p.name for p in args.notebooks]
                     or runner.course_notebooks(root))
        start = time.perf_counter()
        build = runner.run_course(notebooks, out, smoke=not args.full,
                                  keep_going=True, progress=False,
                                  solutions=args.solutions,
                                  timeout=args.timeout,
                                  environ=environ, jobs=args.jobs)
        wall = time.perf_counter() - start
    load = "beside a busy process" if args.load else "quiet"
    rev = args.rev or "working tree"
    print(f"mode: {build.mode}; {load}; revision {rev}; {args.jobs} at a "
          f"time; budgets: {per_nb} s and {per_mem} MiB per notebook")
    print(f"{'notebook':38s} {'status':7s} {'seconds':>8s} {'x budget':>9s}"
          f" {'peak MiB':>9s} {'x budget':>9s}")
    ok = build.ok
    stopped = 0
    for r in build.results:
        t_ratio = r.seconds / per_nb
        m_ratio = r.peak_mem_mb / per_mem
        ok &= t_ratio <= 1 and m_ratio <= 1
        status, at_least = r.status, ""
        if timed_out(r):
            status, at_least = "stopped", ">="
            stopped += 1
        print(f"{r.name:38s} {status:7s} {at_least:>2s}{r.seconds:6.1f} "
              f"{t_ratio:9.2f} {r.peak_mem_mb:9.0f} {m_ratio:9.2f}")
    total = sum(r.seconds for r in build.results)
    if stopped:
        print(f"{stopped} notebook(s) stopped at the {args.timeout:g} s "
              "limit: their times, and the total, are lower bounds")
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


def checkout(stack, rev):
    """Check `rev` out into a temporary worktree; return its folder."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "course"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach",
                    "-q", str(root), rev], check=True)
    stack.callback(subprocess.run, ["git", "-C", str(ROOT), "worktree",
                                    "remove", "--force", str(root)])
    return root


@contextlib.contextmanager
def as_of(root):
    """Give the environment of kernels that import `root`'s tlhelpers and
    start without today's runtime settings (threads, waiting, allocator)."""
    with mock.patch.object(kernels, "runtime_env", lambda threads=None: {}):
        yield dict(os.environ, PYTHONPATH=str(root))


def run_one(path, out, args, environ=None, timeout=None):
    """Run one notebook in a fresh kernel; return its NotebookResult."""
    build = runner.run_course([path], out, smoke=not args.full,
                              keep_going=True, progress=False,
                              solutions=args.solutions,
                              timeout=args.timeout if timeout is None
                              else timeout, environ=environ)
    return build.results[0]


def seconds(result):
    """A result's time, marked ">=" when it was stopped at its limit."""
    return f"{'>=' if timed_out(result) else ''}{result.seconds:.1f}"


def compare(args, old_root, out):
    """Run each notebook at the old revision and today; print them."""
    names = [p.name for p in (args.notebooks
                              or runner.course_notebooks(ROOT))]
    old_names = {p.name for p in runner.course_notebooks(old_root)}
    load = "beside a busy process" if args.load else "quiet"
    mode = "full" if args.full else "SMOKE"
    print(f"mode: {mode}; {load}; {args.against} against the working tree, "
          "one notebook at a time, in turn", flush=True)
    print(f"{'notebook':38s} {'then s':>8s} {'today s':>8s} "
          f"{'then/today':>10s} {'then MiB':>9s} {'today MiB':>9s}",
          flush=True)
    totals = {"then": 0.0, "today": 0.0}
    stopped = False
    for i, name in enumerate(names):
        arms = ["today", "then"] if i % 2 == 0 or args.stop_at else [
            "then", "today"]
        if name not in old_names:
            arms = ["today"]
        got = {}
        for arm in arms:
            if arm == "today":
                got[arm] = run_one(ROOT / "notebooks" / name, out / arm,
                                   args)
                continue
            timeout = None
            if args.stop_at and "today" in got:
                timeout = max(1.0, args.stop_at * got["today"].seconds)
            with as_of(old_root) as environ:
                got[arm] = run_one(old_root / "notebooks" / name, out / arm,
                                   args, environ, timeout)
        today = got["today"]
        if "then" not in got:
            print(f"{name:38s} {'-':>8s} {seconds(today):>8s} {'-':>10s} "
                  f"{'-':>9s} {today.peak_mem_mb:9.0f}", flush=True)
            continue
        then = got["then"]
        stopped |= timed_out(then)
        ratio = ((">=" if timed_out(then) else "")
                 + f"x{then.seconds / today.seconds:.2f}")
        failed = [f"{arm} {r.status}{reason(r)}" for arm, r in got.items()
                  if r.status != "passed" and not timed_out(r)]
        print(f"{name:38s} {seconds(then):>8s} {seconds(today):>8s} "
              f"{ratio:>10s} {then.peak_mem_mb:9.0f} "
              f"{today.peak_mem_mb:9.0f}"
              + (f"  ({', '.join(failed)})" if failed else ""), flush=True)
        totals["then"] += then.seconds
        totals["today"] += today.seconds
    bound = ">=" if stopped else ""
    print(f"the notebooks both revisions have: then {bound}"
          f"{totals['then']:.1f} s, today {totals['today']:.1f} s, "
          f"then/today {bound}x{totals['then'] / totals['today']:.2f}")
    return 0


def reason(result):
    """Why a notebook failed, short enough for a table row: the cell and
    the exception with the first line of its message."""
    err = result.error
    if err is None:
        return ""
    where = "" if err.cell is None else f"cell {err.cell}: "
    message = (str(err.evalue).strip().splitlines() or [""])[0]
    text = f"{where}{err.ename}: {message}".rstrip(": ")
    return ": " + (text if len(text) <= 90 else text[:87] + "...")


def timed_out(result):
    """Whether a notebook failed because it reached its time limit (the
    error kernels.cell_error names "Timeout")."""
    return (result.status == "failed" and result.error is not None
            and result.error.ename == "Timeout")


if __name__ == "__main__":
    sys.exit(main())
