"""Time every course notebook and measure its kernel's peak memory.

Runs the notebooks one after another, each in a fresh kernel (as
`tlcourse run` does), and prints each one's wall time and peak resident
memory against the course budgets, with the ratios:

    python benchmarks/bench_notebooks.py            # SMOKE mode (CI)
    python benchmarks/bench_notebooks.py --full     # what a learner gets
"""

import argparse
import sys
import tempfile
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
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    mode = "full" if args.full else "smoke"
    per_nb, per_mem, total_budget = BUDGETS[mode]
    notebooks = args.notebooks or runner.course_notebooks(ROOT)
    with tempfile.TemporaryDirectory() as out:
        build = runner.run_course(notebooks, out, smoke=not args.full,
                                  keep_going=True, progress=False,
                                  solutions=args.solutions, timeout=1200)
    print(f"mode: {build.mode}; budgets: {per_nb} s and {per_mem} MiB "
          "per notebook")
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
    line = f"total {total:.1f} s"
    if total_budget:
        line += f" (budget {total_budget} s, x{total / total_budget:.2f})"
        ok &= total <= total_budget
    print(line)
    print("within budgets" if ok else "OVER BUDGET or failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
