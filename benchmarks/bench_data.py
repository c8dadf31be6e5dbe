"""Print how many synthetic images per second one CPU core draws.

Target (issue 3): at least 2,000 images of 64 px per second, so data never
dominates a notebook's time. Run: python benchmarks/bench_data.py
"""

import argparse
import time

import torch

from tlhelpers.data import DOMAINS, KINDS, synthetic_images, with_transform

TARGET = 2000


def rate(dataset, repeats=3, clock=time.process_time):
    """Return the best images-per-second over a few passes.

    The default clock counts this process's CPU time, which is what one
    core delivers even when other programs share the machine.
    """
    best = 0.0
    for _ in range(repeats):
        start = clock()
        for i in range(len(dataset)):
            dataset[i]
        best = max(best, len(dataset) / max(clock() - start, 1e-9))
    return best


def eager_vs_lazy(n, size):
    """Time drawing everything up front against drawing on each read."""
    ds = synthetic_images(n_per_class=n // 5, image_size=size)
    start = time.process_time()
    images = [ds.render(i) for i in range(len(ds))]
    build = time.process_time() - start
    start = time.process_time()
    for _ in range(3):
        for im in images:
            im.copy()
    eager_epoch = (time.process_time() - start) / 3
    return build, eager_epoch, len(ds) / rate(ds, repeats=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000,
                        help="images per measurement")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"synthetic images, {args.size} px, one thread, "
          f"{args.n} images per row (best of 3)")
    print(f"{'kind':<9} {'domain':<11} {'images/s (CPU)':>14} "
          f"{'(wall clock)':>13}")
    rates = []
    for kind in KINDS:
        for domain in DOMAINS:
            ds = synthetic_images(kind, classes=5, image_size=args.size,
                                  n_per_class=args.n // 5, domain=domain)
            r = rate(ds)
            wall = rate(ds, repeats=1, clock=time.perf_counter)
            rates.append(r)
            print(f"{kind:<9} {domain:<11} {r:>14,.0f} {wall:>13,.0f}")
    worst = min(rates)
    verdict = "OK" if worst >= TARGET else "BELOW TARGET"
    print(f"slowest: {worst:,.0f} images/s (target {TARGET:,}): {verdict}")

    from torchvision.transforms import ToTensor

    ds = with_transform(synthetic_images(n_per_class=args.n // 5,
                                         image_size=args.size), ToTensor())
    print(f"photo shapes + ToTensor: {rate(ds):,.0f} images/s (CPU)")

    build, eager, lazy = eager_vs_lazy(500, args.size)
    print(f"500 images (CPU): draw all up front {build * 1e3:.0f} ms, then "
          f"{eager * 1e3:.1f} ms per epoch; drawn on read "
          f"{lazy * 1e3:.0f} ms per epoch")


if __name__ == "__main__":
    main()
