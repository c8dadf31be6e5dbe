"""How much slower is a notebook beside another CPU-bound program?

Runs notebook 03 in SMOKE mode (as `tlcourse run --smoke` does, one
fresh kernel each time) on a quiet machine and then beside one CPU-bound
Python process (a busy loop), for each thread setting ("arm"), and prints
both times and their ratio side by side:

    python benchmarks/bench_contention.py [--arms spin,passive] [--runs 1]

Arms:
- spin: OMP_NUM_THREADS = cores, OpenMP's default waiting (threads spin
  a while before they sleep: GNU OpenMP's default GOMP_SPINCOUNT, which
  wins over the course's OMP_WAIT_POLICY);
- passive: the course's settings (tlhelpers.kernels.thread_env):
  OMP_NUM_THREADS = cores and OMP_WAIT_POLICY=PASSIVE;
- one: a single thread.
Target (issue 20) on 2 cores: loaded / quiet <= 2.5 for the course's
setting, and its quiet time <= 1.1x that of spin.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlhelpers import kernels, runner

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_fine_tuning.ipynb"
GOMP_DEFAULT_SPINCOUNT = 300_000  # GNU OpenMP's default with no policy set


def arm_env(arm):
    cores = kernels.usable_cores()
    env = {k: v for k, v in os.environ.items()
           if k not in kernels.THREAD_VARIABLES
           and k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if arm == "spin":
        env.update(kernels.thread_env(cores, wait_policy=None))
        env["GOMP_SPINCOUNT"] = str(GOMP_DEFAULT_SPINCOUNT)
    elif arm == "passive":
        env.update(kernels.thread_env(cores))
    elif arm == "one":
        env.update(kernels.thread_env(1))
    else:
        raise SystemExit(f"unknown arm {arm!r}: spin, passive or one")
    return env


def run_once(arm, notebook):
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        build = runner.run_course([notebook], out, smoke=True,
                                  progress=False, timeout=3600,
                                  environ=arm_env(arm))
        seconds = time.perf_counter() - t0
    if not build.ok:
        raise SystemExit(f"{notebook.name} failed under arm {arm}")
    return seconds


def busy():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv=None):
    """Time the notebook quiet and loaded for each arm; print ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="spin,passive")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK)
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    times = {(a, load): [] for a in arms for load in ("quiet", "loaded")}
    for r in range(args.runs):
        order = arms if r % 2 == 0 else arms[::-1]
        for load in ("quiet", "loaded"):
            for arm in order:
                hog = busy() if load == "loaded" else None
                try:
                    times[arm, load].append(run_once(arm, args.notebook))
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                print(f"  {arm:8s} {load:7s} "
                      f"{times[arm, load][-1]:7.1f} s", flush=True)
    base = statistics.median(times[arms[0], "quiet"])
    print(f"{args.notebook.name}, SMOKE, {kernels.usable_cores()} cores, "
          f"medians of {args.runs} run(s)")
    print(f"{'arm':8s} {'quiet s':>8s} {'loaded s':>9s} {'loaded/quiet':>13s}"
          f" {'quiet vs ' + arms[0]:>14s}")
    for arm in arms:
        quiet = statistics.median(times[arm, "quiet"])
        loaded = statistics.median(times[arm, "loaded"])
        print(f"{arm:8s} {quiet:8.1f} {loaded:9.1f} {loaded / quiet:13.2f}"
              f" {quiet / base:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
