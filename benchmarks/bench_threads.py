"""One kernel with two threads, or two kernels with one thread each?

EfficientNet-Lite0 training and inference throughput (images per second)
at the course's image sizes, with the course's kernel settings
(tlhelpers.kernels.runtime_env: passive waiting, tuned allocator) and three
arms, each measurement in fresh processes:

- one: a single process with one thread;
- two: a single process with two threads (the course's default on 2 cores);
- pair: two single-thread processes at the same time (their summed
  throughput: what running two notebooks side by side gets).

The arms alternate and the medians of --runs rounds are printed side by
side, with the ratios two/one and pair/two:

    python benchmarks/bench_threads.py [--runs 3] [--steps 6]

It decides two settings: the thread count of a course kernel
(kernels.default_threads) and how many notebooks `tlcourse run` and the
test passes run at once.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_allocator import WORKER  # noqa: E402  (the same worker)

from tlhelpers import kernels  # noqa: E402

CASES = [("train", 16, size) for size in (48, 64, 96, 128, 224)] + [
    ("inference", 64, size) for size in (64, 128)]


def _start(case, threads, steps):
    mode, batch, size = case
    env = dict(os.environ)
    env.update(kernels.runtime_env(threads))
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, str(batch), str(size),
         str(steps)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _result(proc, case):
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the worker for {case} failed with exit code "
                         f"{proc.returncode}:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])["ips"]


def measure(case, arm, steps):
    """Images per second of one arm (pair: both processes' sum)."""
    if arm == "pair":
        procs = [_start(case, 1, steps) for _ in range(2)]
        return sum(_result(p, case) for p in procs)
    return _result(_start(case, 1 if arm == "one" else 2, steps), case)


def main(argv=None):
    """Measure every arm for every case and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    arms = ("one", "two", "pair")
    print(f"course kernel settings {kernels.runtime_env(2)}; medians of "
          f"{args.runs} alternating rounds, images per second")
    print(f"{'case':22s} {'one':>8s} {'two':>8s} {'pair':>8s} "
          f"{'two/one':>8s} {'pair/two':>9s}")
    for case in CASES:
        got = {arm: [] for arm in arms}
        for r in range(args.runs):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                got[arm].append(measure(case, arm, args.steps))
        ips = {arm: statistics.median(got[arm]) for arm in arms}
        name = f"{case[0]} b{case[1]} {case[2]}px"
        print(f"{name:22s} {ips['one']:8.1f} {ips['two']:8.1f} "
              f"{ips['pair']:8.1f} {ips['two'] / ips['one']:8.2f} "
              f"{ips['pair'] / ips['two']:9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
