"""Measure the course's central claim: when do pretrained features help?

Three strategies, each with 10 labelled images per class and an equal
training budget (the same epochs and batches for the two trained ones):

- linear probe: frozen ImageNet efficientnet_lite0 features + scikit-learn
  logistic regression (C=1, raw features; the row "linear_probe()" shows
  tlhelpers.features.linear_probe, which standardises them first);
- fine-tune all: the same ImageNet network, every layer trained with AdamW;
- from scratch: the same architecture from random weights, AdamW.

Two settings, side by side:

- near: the default synthetic shapes task (5 classes, photo domain, 64 px),
  colourful pictures of objects, the kind of images ImageNet holds;
- far: scikit-learn's 8x8 handwritten digits (10 classes, upscaled), a
  domain ImageNet never saw.

Run: python benchmarks/bench_transfer.py [--seeds 3] [--threads 1]
"""

import argparse
import time

import numpy as np
import torch

from tlhelpers import config, models
from tlhelpers.data import (digits, few_shot, make_loaders, synthetic_images,
                            train_val_split, with_transform)
from tlhelpers.features import extract_features, linear_probe
from tlhelpers.training import evaluate, fit

BACKBONE = "efficientnet_lite0"
STRATEGIES = ("linear probe", "fine-tune all", "from scratch")
# AdamW learning rates: gentle for pretrained weights, larger from scratch
LR_FINE_TUNE = 3e-4
LR_SCRATCH = 1e-3


def near_task(k=10, test_per_class=60, seed=0):
    """Return (train, test) of the default shapes task; PIL images."""
    train = synthetic_images(n_per_class=k, seed=seed)
    test = synthetic_images(n_per_class=test_per_class, seed=10_000 + seed)
    return train, test


def far_task(k=10, test_per_class=30, seed=0):
    """Return (train, test) drawn from separate halves of the digits."""
    pool, held_out = train_val_split(digits(image_size=32), 0.5, seed=seed)
    return (few_shot(pool, k, seed=seed),
            few_shot(held_out, test_per_class, seed=seed))


def probe_accuracies(train, test, image_size=64):
    """Return test accuracy of logistic regression on frozen features.

    Returns:
        (on raw features, after tlhelpers.features.linear_probe's
        standardisation). With 10 images per class and 1,280 features,
        standardising costs about 4 points here.
    """
    from sklearn.linear_model import LogisticRegression

    pre = models.load_pretrained(BACKBONE, image_size=image_size)
    tr, te = [extract_features(pre, with_transform(ds, pre.transform),
                               cache=False, progress=False)
              for ds in (train, test)]
    raw = LogisticRegression(C=1.0, max_iter=3000).fit(
        tr.features.numpy(), tr.labels.numpy())
    return (float(raw.score(te.features.numpy(), te.labels.numpy())),
            linear_probe(tr, te, method="logistic").accuracy)


def trained_accuracy(train, test, weights, lr, epochs=30, image_size=64,
                     batch_size=10, seed=0):
    """Train every layer for a fixed budget; return the test accuracy."""
    config.seed_everything(seed)
    pre = models.load_pretrained(BACKBONE, weights=weights,
                                 num_classes=len(train.classes),
                                 image_size=image_size)
    train_loader, test_loader = make_loaders(
        with_transform(train, pre.transform),
        with_transform(test, pre.transform), batch_size=batch_size,
        seed=seed)
    optimizer = models.make_optimizer(pre, lr=lr)
    # keep_best=False: a fixed budget, no peeking at any validation set
    fit(pre, train_loader, None, optimizer, epochs, progress=False,
        keep_best=False)
    return evaluate(pre, test_loader)["accuracy"]


def run_strategy(strategy, train, test, epochs=30, image_size=64, seed=0):
    """Return the test accuracy of one strategy on one task."""
    if strategy == "linear probe":
        return probe_accuracies(train, test, image_size)[0]
    weights, lr = (("imagenet", LR_FINE_TUNE) if strategy == "fine-tune all"
                   else (None, LR_SCRATCH))
    return trained_accuracy(train, test, weights, lr, epochs, image_size,
                            seed=seed)


def near_domain_check(k=10, epochs=30, image_size=64, seed=0):
    """Return (probe, scratch) accuracy on the default shapes task."""
    train, test = near_task(k, seed=seed)
    return (run_strategy("linear probe", train, test, epochs, image_size),
            run_strategy("from scratch", train, test, epochs, image_size,
                         seed))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=10,
                        help="labelled images per class")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tasks = {"near: shapes (photo)": near_task, "far: digits": far_task}
    results = {(t, s): [] for t in tasks for s in STRATEGIES}
    seconds = dict.fromkeys(results, 0.0)
    standardised = {t: [] for t in tasks}
    for seed in range(args.seeds):
        for task, make in tasks.items():
            train, test = make(args.k, seed=seed)
            for strategy in STRATEGIES:
                start = time.process_time()
                if strategy == "linear probe":
                    acc, std = probe_accuracies(train, test, args.image_size)
                    standardised[task].append(std)
                else:
                    acc = run_strategy(strategy, train, test, args.epochs,
                                       args.image_size, seed)
                seconds[task, strategy] += time.process_time() - start
                results[task, strategy].append(acc)
                print(f"  seed {seed} {task:<21} {strategy:<14} "
                      f"{acc:6.1%}", flush=True)

    print(f"\n{BACKBONE}, {args.k} labelled images per class, "
          f"{args.image_size} px, {args.epochs} epochs for trained "
          f"strategies, mean of {args.seeds} seed(s); CPU seconds in ()")
    width = 24
    print(f"{'':<16}" + "".join(f"{t:>{width}}" for t in tasks))
    for strategy in STRATEGIES:
        cells = []
        for task in tasks:
            acc = np.mean(results[task, strategy])
            sec = seconds[task, strategy] / args.seeds
            cells.append(f"{acc:6.1%} ({sec:4.0f} s)")
        print(f"{strategy:<16}" + "".join(f"{c:>{width}}" for c in cells))
    print(f"{'  linear_probe()':<16}" + "".join(
        f"{np.mean(standardised[t]):>{width - 9}.1%} (std.)  "
        for t in tasks))
    gaps = [np.mean(results[t, "linear probe"])
            - np.mean(results[t, "fine-tune all"]) for t in tasks]
    print(f"{'probe - fine-tune':<16}" + "".join(
        f"{g * 100:>+{width - 7}.1f} points" for g in gaps))


if __name__ == "__main__":
    main()
