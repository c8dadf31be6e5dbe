"""Careful fine-tuning against the pitfall and feature extraction, 3 seeds.

Strategies (tlhelpers.strategies, one budget, AdamW, batch size 16):

- feature_extraction: a linear probe on frozen Lite0 features;
- naive_fine_tuning: every layer at one rate from step one, random head,
  BatchNorm statistics following the batches (the pitfall);
- fine_tuning: head warm-up, then every group at discriminative rates,
  with each BatchNorm policy ("frozen", "frozen_groups", "train"): the
  rows that pick models.DEFAULT_BN_STATS.

Two regimes, as the course's decision guide states them:

- far, enough labels: scikit-learn's 8x8 digits (a domain ImageNet never
  saw), 40 labelled images per class;
- near, few labels: the photo shapes (the kind of images ImageNet holds),
  5 and 10 labelled images per class.

Every configuration runs once per seed (the few-shot subset, the head and
the batches change with it); the table shows the mean and [min, max].
Accuracies are what matter here; times on a shared machine are noisy.

Run: python benchmarks/bench_strategies.py [--seeds 3] [--epochs 8]
     [--warmup-epochs 1] [--lr-mult 10] [--schedule one_cycle]
"""

import argparse
import time

import torch

from tlhelpers import data, models, strategies
from tlhelpers.strategies import compare_strategies

BACKBONE = "efficientnet_lite0"
IMAGE_SIZE = 64


def materialise(dataset, transform):
    """Preprocess every image once; return a LabelledImages of tensors."""
    images = [transform(dataset[i][0]) for i in range(len(dataset))]
    return data.LabelledImages(images, list(dataset.targets),
                               dataset.classes)


def far_task(transform, test_per_class=40):
    """Digits: a pool to draw labelled subsets from, a separate test set."""
    pool, held_out = data.train_val_split(data.digits(image_size=32), 0.5,
                                          seed=0)
    test = data.few_shot(held_out, test_per_class, seed=0)
    return materialise(pool, transform), materialise(test, transform)


def near_task(transform, pool_per_class=20, test_per_class=60):
    """Photo shapes: a labelled pool and a test set drawn from other seeds."""
    pool = data.synthetic_images(n_per_class=pool_per_class, seed=1,
                                 image_size=IMAGE_SIZE)
    test = data.synthetic_images(n_per_class=test_per_class, seed=10_000,
                                 image_size=IMAGE_SIZE)
    return materialise(pool, transform), materialise(test, transform)


def _progress(table, suffix=""):
    """Print each run as it finishes (a long benchmark shows its way)."""
    for r in table.runs:
        print(f"  run: {r['strategy']}{suffix}, {r['labels_per_class']} "
              f"per class, seed {r['seed']}: {r['accuracy']:.1%}",
              flush=True)


def run(train, test, labels, seeds, args):
    """Return {(k, strategy label): (mean, min, max)} for one regime."""
    results = {}
    common = dict(model=BACKBONE, labels_per_class=labels, seeds=seeds,
                  epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  warmup_epochs=args.warmup_epochs, lr_mult=args.lr_mult,
                  schedule=args.schedule, progress=False)
    plain = compare_strategies(
        train, test, strategies=["feature_extraction", "naive_fine_tuning"],
        **common)
    _progress(plain)
    rows = list(plain)
    for policy in args.policies:
        table = compare_strategies(train, test, strategies=["fine_tuning"],
                                   bn_stats=policy, **common)
        _progress(table, f" ({policy})")
        for row in table:
            rows.append(dict(row, strategy=f"fine_tuning ({policy})"))
    for row in rows:
        results[row["labels_per_class"], row["strategy"]] = (
            row["accuracy"], row["accuracy_min"], row["accuracy_max"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--far-labels", type=int, nargs="+", default=[40])
    parser.add_argument("--near-labels", type=int, nargs="+",
                        default=[5, 10])
    parser.add_argument("--warmup-epochs", type=int,
                        default=strategies.WARMUP_EPOCHS)
    parser.add_argument("--lr-mult", type=float, default=strategies.LR_MULT)
    parser.add_argument("--schedule", default=None,
                        choices=[s for s in strategies.SCHEDULES if s])
    parser.add_argument("--policies", nargs="+", default=list(
        models.BN_STATS), choices=list(models.BN_STATS),
        help="BatchNorm policies to run fine_tuning with")
    parser.add_argument("--regimes", nargs="+", default=["far", "near"],
                        choices=["far", "near"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    transform = models.load_pretrained(BACKBONE, weights=None,
                                       image_size=IMAGE_SIZE).transform
    start = time.perf_counter()
    regimes = {}
    if "far" in args.regimes:
        train, test = far_task(transform)
        regimes["far: digits"] = run(train, test, args.far_labels, seeds,
                                     args)
    if "near" in args.regimes:
        train, test = near_task(transform)
        regimes["near: photo shapes"] = run(train, test, args.near_labels,
                                            seeds, args)
    print(f"{BACKBONE}, {IMAGE_SIZE} px, {args.epochs} epochs, lr "
          f"{args.lr:g}, batch {args.batch_size}; fine_tuning: warm-up "
          f"{args.warmup_epochs} epoch(s), lr_mult {args.lr_mult:g}, "
          f"schedule {args.schedule}; seeds {seeds}: mean accuracy "
          "[min, max]")
    for regime, results in regimes.items():
        print(f"\n{regime}")
        sizes = sorted({k for k, _ in results})
        names = list(dict.fromkeys(s for _, s in results))
        print(f"  {'strategy':<30}" + "".join(f"{f'{k} per class':>24}"
                                             for k in sizes))
        for name in names:
            cells = "".join(
                f"{mean:>8.1%} [{lo:.1%}, {hi:.1%}]".rjust(24)
                for mean, lo, hi in (results[k, name] for k in sizes))
            print(f"  {name:<30}{cells}")
        for k in sizes:
            if (k, f"fine_tuning ({models.DEFAULT_BN_STATS})") not in results:
                continue
            careful = results[k, f"fine_tuning ({models.DEFAULT_BN_STATS})"]
            for other in ("naive_fine_tuning", "feature_extraction"):
                mean, lo, hi = results[k, other]
                beats = careful[1] > hi
                print(f"  {k} per class: fine_tuning "
                      f"({models.DEFAULT_BN_STATS}) - {other}: "
                      f"{(careful[0] - mean) * 100:+.1f} points; "
                      f"{'beats' if beats else 'does not beat'} it beyond "
                      "the spread (its min above the other's max)")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
