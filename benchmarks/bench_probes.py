"""Which linear probe should the course use by default?

Frozen EfficientNet-Lite0 features (96 px) of a near task (10 synthetic
shapes, photo domain), a farther one (the same shapes drawn as sketches)
and a far one (scikit-learn digits 0-9), at 5, 10
and 40 labels per class, 3 seeds each; every probe option is trained on
the same features and scored on the same held-out images. Prints the mean
test accuracy (and min-max over seeds) and the median probe time of each
option, side by side, with the two probes as they were before issue 20
("before: ..."), and which option is the default:

    python benchmarks/bench_probes.py [--seeds 3] [--sizes 5,10,40]

Target (issue 20): the default within 1 point of the best option at every
size, on both tasks.
"""

import argparse
import inspect
import statistics
import time

import numpy as np
import torch

from tlhelpers import models
from tlhelpers.data import digits, synthetic_images, with_transform
from tlhelpers.features import Features, extract_features, linear_probe

SIZE = 96
OPTIONS = {  # name: linear_probe keyword arguments (or a function)
    "logistic, standardised": dict(method="logistic", standardize=True),
    "logistic, raw": dict(method="logistic", standardize=False),
    "logistic, global scale": dict(method="logistic",
                                   standardize="global"),
    "torch, standardised": dict(method="torch", standardize=True),
    "torch, raw": dict(method="torch", standardize=False),
    "torch, global scale": dict(method="torch", standardize="global"),
}


def _before_logistic(train, test):
    """The probe before issue 20: scikit-learn's StandardScaler."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with threadpool_limits(1):
        clf.fit(train.features.numpy(), train.labels.numpy())
        return clf.score(test.features.numpy(), test.labels.numpy())


def _before_torch(train, test):
    """The torch probe before issue 20: per-feature std floored at 1e-6."""
    x = train.features
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    scaled = Features((x - mean) / std, train.labels)
    held = Features((test.features - mean) / std, test.labels)
    return linear_probe(scaled, held, method="torch",
                        standardize=False).accuracy


BEFORE = {"before: logistic, StandardScaler": _before_logistic,
          "before: torch, 1e-6 floor": _before_torch}


def pools(pretrained, seeds, max_k):
    """Return {task: [(train pool Features, test Features) per seed]}."""
    shapes = {}
    for domain in ("photo", "sketch"):
        shapes[domain] = []
        for seed in seeds:
            split = [with_transform(synthetic_images(
                classes=10, n_per_class=n, image_size=SIZE, domain=domain,
                seed=base + seed), pretrained.transform)
                for n, base in ((max_k, 1000), (20, 5000))]
            shapes[domain].append(tuple(
                extract_features(pretrained, d, progress=False)
                for d in split))
    # The digits once; each seed splits them differently.
    every = extract_features(
        pretrained, with_transform(digits(image_size=SIZE),
                                   pretrained.transform), progress=False)
    far = []
    for seed in seeds:
        order = torch.from_numpy(
            np.random.default_rng(seed).permutation(len(every)))
        test, pool = order[:400], order[400:]
        far.append((Features(every.features[pool], every.labels[pool]),
                    Features(every.features[test], every.labels[test])))
    return {"near (10 shapes, photo)": shapes["photo"],
            "farther (10 shapes, sketch)": shapes["sketch"],
            "far (digits)": far}


def subset(features, k, seed):
    """Return k examples per class of `features`, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    labels = features.labels.numpy()
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k]
                           for c in np.unique(labels)])
    keep = torch.from_numpy(np.sort(keep))
    return Features(features.features[keep], features.labels[keep])


def main(argv=None):
    """Score every probe option on every task, size and seed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sizes", default="5,10,40")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = list(range(args.seeds))
    pretrained = models.load_pretrained("efficientnet_lite0")
    data = pools(pretrained, seeds, max(sizes))
    print(f"Lite0 features at {SIZE} px; mean test accuracy % over "
          f"{len(seeds)} seeds [min-max]; median probe time")
    worst_gap = 0.0
    for task, per_seed in data.items():
        for k in sizes:
            rows = {}
            for name, kw in {**OPTIONS, **BEFORE}.items():
                accs, secs = [], []
                for seed, (pool, test) in zip(seeds, per_seed):
                    train = subset(pool, k, seed)
                    t0 = time.perf_counter()
                    accs.append(100 * (kw(train, test) if callable(kw)
                                       else linear_probe(train, test,
                                                         **kw).accuracy))
                    secs.append(time.perf_counter() - t0)
                rows[name] = (statistics.mean(accs), min(accs), max(accs),
                              statistics.median(secs))
            best = max(r[0] for n, r in rows.items() if n in OPTIONS)
            default_acc = rows[DEFAULT][0]
            worst_gap = max(worst_gap, best - default_acc)
            print(f"\n{task}, {k} per class (best {best:.1f}, default "
                  f"{default_acc:.1f}, gap {best - default_acc:.1f})")
            for name, (mean, lo, hi, sec) in rows.items():
                mark = "  <- default" if name == DEFAULT else ""
                print(f"  {name:24s} {mean:6.1f} [{lo:5.1f}-{hi:5.1f}] "
                      f"{sec:7.3f} s{mark}")
    print(f"\nlargest gap between the best option and the default: "
          f"{worst_gap:.1f} points (target <= 1)")
    return 0


def _default_option():
    """Return the name of the option linear_probe uses by default."""
    params = inspect.signature(linear_probe).parameters
    chosen = {k: params[k].default for k in ("method", "standardize")}
    for name, kw in OPTIONS.items():
        if kw == chosen:
            return name
    raise SystemExit(f"linear_probe's default {chosen} is not an option")


DEFAULT = _default_option()

if __name__ == "__main__":
    raise SystemExit(main())
