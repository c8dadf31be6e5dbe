"""Does a tuned glibc allocator make the course's torch work faster?

EfficientNet-Lite0 inference and training throughput (images per second)
at batch 16 and 64, 96 and 128 px, with glibc's default malloc settings
and with the course's tuned ones (tlhelpers.kernels.ALLOCATOR: large
blocks from the heap instead of fresh mmap pages, and freed memory kept
instead of trimmed), plus each arm's peak resident memory. Each
measurement runs in a fresh process (the settings are read at start-up);
the arms alternate and the medians of --runs rounds are printed, with
their ratio, side by side:

  python benchmarks/bench_allocator.py [--runs 5] [--threads 2] [--mode train]

Decision rule (issue 20): switch the tuning on only if it speeds up both
inference and training with at most 10 % more peak memory.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from tlhelpers import kernels

CASES = [(mode, batch, size) for mode in ("inference", "train")
         for batch in (16, 64) for size in (96, 128)]
WORKER = r"""
import json, resource, sys, time
import torch
from tlhelpers import models
mode, batch, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4])
torch.manual_seed(0)
net = models.load_pretrained("efficientnet_lite0", num_classes=10).model
x = torch.randn(batch, 3, size, size)
y = torch.randint(0, 10, (batch,))
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
def step():
    if mode == "inference":
        net.eval()
        with torch.inference_mode():
            net(x)
    else:
        net.train()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
for _ in range(2):
    step()  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"ips": steps * batch / seconds, "peak_mb": peak}))
"""


def measure(case, tuned, threads, steps):
    mode, batch, size = case
    env = dict(os.environ)
    for key in kernels.ALLOCATOR:
        env.pop(key, None)
    env.update(kernels.thread_env(threads))
    if tuned:
        env.update(kernels.ALLOCATOR)
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(batch), str(size),
         str(steps)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the worker for {case} (tuned={tuned}) failed "
                         f"with exit code {out.returncode}:\n"
                         f"{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    """Measure both arms for every case and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mode", choices=["inference", "train"],
                        help="measure only this mode's cases")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.mode in (None, c[0])]
    print(f"allocator settings: {kernels.ALLOCATOR}; threads "
          f"{args.threads}; medians of {args.runs} alternating runs")
    print(f"{'case':22s} {'default img/s':>14s} {'tuned img/s':>12s} "
          f"{'ratio':>6s} {'default MB':>11s} {'tuned MB':>9s} "
          f"{'mem ratio':>9s}")
    verdict = {"inference": [], "train": []}
    for case in cases:
        got = {False: [], True: []}
        for r in range(args.runs):
            for tuned in ((False, True) if r % 2 == 0 else (True, False)):
                got[tuned].append(measure(case, tuned, args.threads,
                                          args.steps))
        ips = {t: statistics.median(m["ips"] for m in got[t]) for t in got}
        mem = {t: statistics.median(m["peak_mb"] for m in got[t])
               for t in got}
        ratio, mem_ratio = ips[True] / ips[False], mem[True] / mem[False]
        verdict[case[0]].append((ratio, mem_ratio))
        name = f"{case[0]} b{case[1]} {case[2]}px"
        print(f"{name:22s} {ips[False]:14.1f} {ips[True]:12.1f} "
              f"{ratio:6.2f} {mem[False]:11.0f} {mem[True]:9.0f} "
              f"{mem_ratio:9.2f}", flush=True)
    helps = all(r > 1.0 for rows in verdict.values() for r, _ in rows
                if rows)
    lean = all(m <= 1.10 for rows in verdict.values() for _, m in rows)
    print("speeds up inference and training with <= 10 % more memory: "
          f"{'yes' if helps and lean else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
