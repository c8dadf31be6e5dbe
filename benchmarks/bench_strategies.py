"""Careful fine-tuning against the pitfall and feature extraction, 3 seeds.

Strategies (tlhelpers.strategies, one budget, AdamW, batch size 16):

- feature_extraction: a linear probe on frozen Lite0 features;
- naive_fine_tuning: every layer at one rate from step one, random head,
  BatchNorm statistics following the batches (the pitfall);
- fine_tuning: head warm-up, then every group at discriminative rates,
  with each BatchNorm policy ("frozen", "frozen_groups", "train"): the
  rows that pick models.DEFAULT_BN_STATS.

Two regimes, as the course's decision guide states them:

- far, enough labels: the five shapes in heavy grey noise
  (``noisy_gray``, as in notebook 05; or ``sketch``, or scikit-learn's
  8x8 ``digits``), 40 labelled images per class drawn per seed from a
  pool of 80;
- near, few labels: the photo shapes (the kind of images ImageNet holds),
  5 and 10 labelled images per class.

Every configuration runs once per seed (the few-shot subset, the head and
the batches change with it); the tables show the mean and [min, max].
Accuracies are what matter here; times on a shared machine are noisy.

``--sweep`` instead measures the fine_tuning defaults
(strategies.WARMUP_EPOCHS, LR_MULT, and the schedule) with the default
BatchNorm policy, on the far task (40 per class) and the near few-label
task (5 per class): warm-up epochs and lr_mult varied one at a time
around the current defaults (``--full-grid``: every pair), with no
schedule, then each schedule at the best pair. It picks the pair with
the best far mean among those whose near mean is at least the lowest
near run of the best near pair, and says whether a schedule beats none
beyond the spread.

Run: python benchmarks/bench_strategies.py [--seeds 3] [--epochs 8]
     [--far-domain noisy_gray] [--warmup-epochs 1] [--lr-mult 10]
     python benchmarks/bench_strategies.py --sweep [--full-grid]
"""

import argparse
import time

import torch

from tlhelpers import data, models, strategies
from tlhelpers.strategies import compare_strategies

BACKBONE = "efficientnet_lite0"
IMAGE_SIZE = 64
FAR_DOMAINS = ("noisy_gray", "sketch", "digits")


def materialise(dataset, transform):
    """Preprocess every image once; return a LabelledImages of tensors."""
    images = [transform(dataset[i][0]) for i in range(len(dataset))]
    return data.LabelledImages(images, list(dataset.targets),
                               dataset.classes)


def far_task(transform, domain, pool_per_class=80, test_per_class=40):
    """A far domain: a pool to draw labelled subsets from, a test set."""
    if domain == "digits":
        pool, held_out = data.train_val_split(
            data.digits(image_size=32), 0.5, seed=0)
        test = data.few_shot(held_out, test_per_class, seed=0)
    else:
        pool = data.synthetic_images(n_per_class=pool_per_class, seed=1,
                                     image_size=IMAGE_SIZE, domain=domain)
        test = data.synthetic_images(n_per_class=test_per_class,
                                     seed=10_000, image_size=IMAGE_SIZE,
                                     domain=domain)
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
              f"per class, seed {r['seed']}: {r['accuracy']:.1%} "
              f"({r['seconds']:.0f} s)", flush=True)


def _common(args, labels, seeds):
    return dict(model=BACKBONE, labels_per_class=labels, seeds=seeds,
                epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                progress=False)


def run(train, test, labels, seeds, args):
    """Return {(k, strategy label): (mean, min, max)} for one regime."""
    results = {}
    common = _common(args, labels, seeds)
    rows = []
    if args.baselines:
        plain = compare_strategies(train, test, strategies=args.baselines,
                                   **common)
        _progress(plain)
        rows += list(plain)
    for policy in args.policies:
        table = compare_strategies(
            train, test, strategies=["fine_tuning"], bn_stats=policy,
            warmup_epochs=args.warmup_epochs, lr_mult=args.lr_mult,
            schedule=args.schedule, **common)
        _progress(table, f" ({policy})")
        for row in table:
            rows.append(dict(row, strategy=f"fine_tuning ({policy})"))
    for row in rows:
        results[row["labels_per_class"], row["strategy"]] = (
            row["accuracy"], row["accuracy_min"], row["accuracy_max"])
    return results


def cell(stats):
    """Format (mean, min, max) as 'mean [min, max]'."""
    mean, lo, hi = stats
    return f"{mean:.1%} [{lo:.1%}, {hi:.1%}]"


def print_regime(regime, results):
    """Print one regime's table and how careful fine-tuning compares."""
    print(f"\n{regime}")
    sizes = sorted({k for k, _ in results})
    names = list(dict.fromkeys(s for _, s in results))
    print(f"  {'strategy':<30}" + "".join(f"{f'{k} per class':>24}"
                                         for k in sizes))
    for name in names:
        print(f"  {name:<30}"
              + "".join(cell(results[k, name]).rjust(24) for k in sizes))
    careful_name = f"fine_tuning ({models.DEFAULT_BN_STATS})"
    for k in sizes:
        if (k, careful_name) not in results:
            continue
        careful = results[k, careful_name]
        for other in ("naive_fine_tuning", "feature_extraction"):
            if (k, other) not in results:
                continue
            mean, lo, hi = results[k, other]
            if careful[1] > hi:
                verdict = "beats it beyond the spread (its min above " \
                          "the other's max)"
            elif lo > careful[2]:
                verdict = "is beaten beyond the spread"
            else:
                verdict = "the spreads overlap"
            print(f"  {k} per class: {careful_name} - {other}: "
                  f"{(careful[0] - mean) * 100:+.1f} points; {verdict}")


def main_comparison(args, transform, seeds):
    """The strategies in both regimes, printed with mean and spread."""
    regimes = {}
    if "far" in args.regimes:
        train, test = far_task(transform, args.far_domain)
        regimes[f"far: {args.far_domain}"] = run(train, test,
                                                 args.far_labels, seeds,
                                                 args)
    if "near" in args.regimes:
        train, test = near_task(transform)
        regimes["near: photo shapes"] = run(train, test, args.near_labels,
                                            seeds, args)
    print(f"\n{BACKBONE}, {IMAGE_SIZE} px, {args.epochs} epochs, lr "
          f"{args.lr:g}, batch {args.batch_size}; fine_tuning: warm-up "
          f"{args.warmup_epochs} epoch(s), lr_mult {args.lr_mult:g}, "
          f"schedule {args.schedule}; seeds {seeds}: mean accuracy "
          "[min, max]")
    for regime, results in regimes.items():
        print_regime(regime, results)


# ---------------------------------------------------------------- sweep


def _fine_tuning(train, test, k, seeds, args, warmup, mult, schedule,
                 tag):
    table = compare_strategies(
        train, test, strategies=["fine_tuning"], warmup_epochs=warmup,
        lr_mult=mult, schedule=schedule, **_common(args, [k], seeds))
    _progress(table, f" {tag}")
    return strategies.spread(table, "fine_tuning", k)


def sweep(args, transform, seeds):
    """Measure fine_tuning's defaults on a grid; print the choice."""
    far = far_task(transform, args.far_domain)
    near = near_task(transform)
    far_k, near_k = args.far_labels[-1], args.near_labels[0]
    probes = {}
    for regime, (train, test), k in (("far", far, far_k),
                                     ("near", near, near_k)):
        table = compare_strategies(train, test,
                                   strategies=["feature_extraction"],
                                   **_common(args, [k], seeds))
        _progress(table)
        probes[regime] = strategies.spread(table, "feature_extraction", k)

    def measure(warmup, mult, schedule):
        tag = f"(warm-up {warmup}, lr_mult {mult:g}, {schedule})"
        result = {regime: _fine_tuning(*task, k, seeds, args, warmup, mult,
                                       schedule, tag)
                  for regime, task, k in (("far", far, far_k),
                                          ("near", near, near_k))}
        print(f"  = {tag}: far {cell(result['far'])}, near "
              f"{cell(result['near'])}", flush=True)
        return result

    if args.full_grid:
        pairs = [(w, m) for w in args.grid_warmup for m in args.grid_lr_mult]
    else:  # one at a time around the current defaults
        w0, m0 = strategies.WARMUP_EPOCHS, strategies.LR_MULT
        pairs = list(dict.fromkeys([(w0, m) for m in args.grid_lr_mult]
                                   + [(w, m0) for w in args.grid_warmup]))
    grid = {(w, float(m), None): measure(w, float(m), None)
            for w, m in pairs}
    best_near = max(grid.values(), key=lambda r: r["near"][0])["near"]
    allowed = [key for key, r in grid.items()
               if r["near"][0] >= best_near[1]]
    pair = max(allowed, key=lambda key: grid[key]["far"][0])
    for schedule in args.grid_schedules:
        grid[pair[0], pair[1], schedule] = measure(pair[0], pair[1],
                                                   schedule)

    print(f"\nfine_tuning sweep: {BACKBONE}, {IMAGE_SIZE} px, "
          f"{args.epochs} epochs, lr {args.lr:g} at the head, batch "
          f"{args.batch_size}, bn_stats {models.DEFAULT_BN_STATS!r}; "
          f"seeds {seeds}: mean accuracy [min, max]")
    print(f"  {'warm-up':>7} {'lr_mult':>7} {'schedule':>10} "
          f"{f'far {args.far_domain}, {far_k}/class':>28} "
          f"{f'near photo, {near_k}/class':>28}")
    print(f"  {'feature_extraction (probe)':>26} "
          f"{cell(probes['far']):>28} {cell(probes['near']):>28}")
    for (w, m, s), r in grid.items():
        mark = "  <- chosen pair" if (w, m, None) == pair and s is None \
            else ""
        print(f"  {w:>7} {m:>7g} {str(s):>10} {cell(r['far']):>28} "
              f"{cell(r['near']):>28}{mark}")
    print(f"\nrule: the best far mean among the pairs whose near mean is "
          f"at least the lowest near run of the best near pair "
          f"({best_near[1]:.1%}): warm-up {pair[0]}, lr_mult {pair[1]:g}")
    plain = grid[pair]
    for schedule in args.grid_schedules:
        r = grid[pair[0], pair[1], schedule]
        lead = r["far"][0] - plain["far"][0]
        beyond = r["far"][1] > plain["far"][2]
        print(f"  schedule {schedule}: far {lead * 100:+.1f} points vs "
              f"none, {'beyond' if beyond else 'within'} the spread; near "
              f"{(r['near'][0] - plain['near'][0]) * 100:+.1f} points")
    current = (strategies.WARMUP_EPOCHS, strategies.LR_MULT, None)
    if current in grid and current != pair:
        r = grid[current]
        print(f"  the current defaults (warm-up {current[0]}, lr_mult "
              f"{current[1]:g}): far "
              f"{(r['far'][0] - plain['far'][0]) * 100:+.1f} points, near "
              f"{(r['near'][0] - plain['near'][0]) * 100:+.1f} points vs "
              "the chosen pair")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true",
                        help="measure fine_tuning's warm-up, lr_mult and "
                             "schedule defaults instead")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--far-domain", default="noisy_gray",
                        choices=FAR_DOMAINS)
    parser.add_argument("--far-labels", type=int, nargs="+", default=[40])
    parser.add_argument("--near-labels", type=int, nargs="+",
                        default=[5, 10])
    parser.add_argument("--warmup-epochs", type=int,
                        default=strategies.WARMUP_EPOCHS)
    parser.add_argument("--lr-mult", type=float, default=strategies.LR_MULT)
    parser.add_argument("--schedule", default=None,
                        choices=[s for s in strategies.SCHEDULES if s])
    parser.add_argument("--baselines", nargs="*", default=[
        "feature_extraction", "naive_fine_tuning"],
        choices=["feature_extraction", "naive_fine_tuning"],
        help="strategies to compare fine_tuning with")
    parser.add_argument("--policies", nargs="*", default=list(
        models.BN_STATS), choices=list(models.BN_STATS),
        help="BatchNorm policies to run fine_tuning with")
    parser.add_argument("--regimes", nargs="+", default=["far", "near"],
                        choices=["far", "near"])
    parser.add_argument("--full-grid", action="store_true",
                        help="sweep every warm-up x lr_mult pair")
    parser.add_argument("--grid-warmup", type=int, nargs="+",
                        default=[0, 1, 2])
    parser.add_argument("--grid-lr-mult", type=float, nargs="+",
                        default=[3, 10, 30])
    parser.add_argument("--grid-schedules", nargs="*",
                        default=["one_cycle", "cosine"],
                        choices=[s for s in strategies.SCHEDULES if s])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    transform = models.load_pretrained(BACKBONE, weights=None,
                                       image_size=IMAGE_SIZE).transform
    start = time.perf_counter()
    if args.sweep:
        sweep(args, transform, seeds)
    else:
        main_comparison(args, transform, seeds)
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
