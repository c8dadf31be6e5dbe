"""Transfer strategies: one vocabulary, the careful recipe, comparisons.

``STRATEGIES`` names every way the course reuses a pretrained network,
with what trains and at which rates; widgets, exercises and plots use
these names. ``fine_tune`` is the careful recipe in one call: the new head
first on the frozen backbone, then every group at discriminative rates,
with BatchNorm statistics kept in check. ``compare_strategies`` trains
several strategies on the same data and budget, over seeds, and reports
the mean and spread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlhelpers import kernels

if TYPE_CHECKING:  # for type hints only: torch loads when a function runs
    from collections.abc import Iterable, Sequence

    from torch.utils.data import DataLoader

    from tlhelpers.display import Table
    from tlhelpers.models import Model
    from tlhelpers.training import GradualUnfreezing, History

# The vocabulary is read by widgets and exercises, which must import
# without torch; everything that trains imports it when called.


@dataclass(frozen=True)
class Strategy:
    """One way to reuse a pretrained network."""

    name: str
    label: str         # how the notebooks say it
    description: str   # one line
    trains: str        # what trains
    rates: str         # at which learning rates


STRATEGIES = OrderedDict((s.name, s) for s in (
    Strategy("from_scratch", "from scratch",
             "the same network from random weights, every layer trained",
             "every layer", "one rate"),
    Strategy("feature_extraction", "feature extraction",
             "a linear probe on cached features of the frozen backbone",
             "a linear classifier on features", "the probe's own solver"),
    Strategy("head_only", "head only",
             "the backbone frozen, only the new head trains",
             "the head", "one rate"),
    Strategy("last_k", "last k groups",
             "the last k layer groups train (head included), the rest "
             "frozen", "the last k groups", "one rate"),
    Strategy("naive_fine_tuning", "naive fine-tuning",
             "the pitfall: every layer trains from step one at one rate, "
             "with a random head and statistics that follow the batches",
             "every layer", "one rate"),
    Strategy("fine_tuning", "fine-tuning",
             "the careful recipe: head warm-up on the frozen backbone, "
             "then every group at discriminative rates, BatchNorm policy",
             "the head, then every layer",
             "lr at the head, lr / lr_mult at the stem"),
    Strategy("gradual_unfreezing", "gradual unfreezing",
             "one more group each epoch from the head down (ULMFiT), "
             "BatchNorm policy", "one more group each epoch",
             "lr at the head, / 2.6 per group down"),
))
NAMES = tuple(STRATEGIES)
# Names used before this vocabulary, and what they are now.
RENAMED = {"full_fine_tuning": "naive_fine_tuning"}

# Defaults of the careful recipe, the measured choice of
# `python benchmarks/bench_strategies.py --sweep` (Lite0, 64 px, 8 epochs,
# 3 seeds, mean [min, max]; far: noisy_gray shapes at 40 labels per class,
# near: photo shapes at 5): one warm-up epoch for the head and lr_mult 30
# give far 86.2 [83.5, 91.0], near 96.1 [92.0, 99.0], against 80.7 [62.5,
# 90.5] and 92.8 [87.0, 97.3] at lr_mult 10 (notebook 03's ratio), 57.2
# and 98.2 at 3; warm-up 0 or 2 at lr_mult 10: far 75.2 or 78.2; the
# probe: far 74.7 [71.0, 81.0], near 96.3. One-cycle or cosine add 1.7-2.0
# points far, within the spread, so no schedule by default.
WARMUP_EPOCHS = 1
# models.DEFAULT_BN_STATS, spelled out so this module imports without torch
BN_STATS_DEFAULT = "frozen"
LR_MULT = 30.0
SCHEDULES = (None, "one_cycle", "cosine")


def check_strategy(name: str) -> str:
    """Return a valid strategy name, or raise saying which ones exist."""
    if name in STRATEGIES:
        return name
    if name in RENAMED:
        raise ValueError(
            f"the strategy {name!r} is now called {RENAMED[name]!r} (every "
            "layer at one rate from the start, the pitfall); the careful "
            "recipe is 'fine_tuning'")
    raise ValueError(f"unknown strategy {name!r}: choose from "
                     f"{', '.join(NAMES)}")


def describe() -> Table:
    """Tabulate the strategies: what each does, trains, at which rates."""
    from tlhelpers.display import Table

    return Table([{"strategy": s.name, "what": s.description,
                   "trains": s.trains, "rates": s.rates}
                  for s in STRATEGIES.values()],
                 title="Transfer strategies")


# ------------------------------------------------------ fine-tuning


def fine_tuning_schedule(model: Model, lr: float,
                         warmup_epochs: int = WARMUP_EPOCHS,
                         lr_mult: float = LR_MULT,
                         bn_stats: str | None = None) -> GradualUnfreezing:
    """Return the careful recipe as a GradualUnfreezing schedule.

    The head trains alone for warmup_epochs, then every group joins at
    its discriminative rate: lr at the head, lr / lr_mult at the stem.
    """
    from tlhelpers import models, training

    if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be an int >= 0, got "
                         f"{warmup_epochs!r}")
    rates = models.group_lrs(model, lr, lr_mult)
    plan = OrderedDict((name, (1 if name == "head" else warmup_epochs + 1,
                               rate))
                       for name, rate in reversed(rates.items()))
    return training.GradualUnfreezing(plan, lr=lr, bn_stats=bn_stats)


def _scheduler(kind, optimizer, epochs, steps_per_epoch):
    import torch

    if kind is None:
        return None
    if kind == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
            epochs=epochs, steps_per_epoch=steps_per_epoch)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                          T_max=epochs)
    raise ValueError(f"unknown schedule {kind!r}: use one of {SCHEDULES}")


def fine_tune(model: Model, train_loader: DataLoader,
              val_loader: Iterable | None = None, epochs: int = 5,
              lr: float = 1e-3, warmup_epochs: int = WARMUP_EPOCHS,
              lr_mult: float = LR_MULT,
              schedule: str | None = None,
              bn_stats: str = BN_STATS_DEFAULT, weight_decay: float = 0.01,
              **fit_kwargs: Any) -> History:
    """Fine-tune carefully in one call; return fit's History.

    The new head trains first on the frozen backbone for warmup_epochs,
    then every group trains at discriminative rates (lr at the head, lr /
    lr_mult at the stem), with the BatchNorm policy bn_stats. schedule is
    None, "one_cycle" or "cosine" over all epochs. Other keywords go to
    fit.
    """
    from tlhelpers import models, training

    if not warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must be fewer "
                         f"than epochs ({epochs}), or the backbone never "
                         "trains")
    plan = fine_tuning_schedule(model, lr, warmup_epochs, lr_mult, bn_stats)
    models.freeze(model, bn_stats=bn_stats)
    optimizer = plan.make_optimizer(model, weight_decay=weight_decay)
    scheduler = _scheduler(schedule, optimizer, epochs, len(train_loader))
    return training.fit(model, train_loader, val_loader, optimizer, epochs,
                        scheduler=scheduler, unfreezing=plan, **fit_kwargs)


def naive_fine_tune(model: Model, train_loader: DataLoader,
                    val_loader: Iterable | None = None, epochs: int = 5,
                    lr: float = 1e-3, weight_decay: float = 0.01,
                    **fit_kwargs: Any) -> History:
    """Train every layer from step one at one rate (the pitfall)."""
    from tlhelpers import models, training

    models.unfreeze(model, bn_stats="frozen_groups")
    optimizer = models.make_optimizer(model, lr=lr,
                                      weight_decay=weight_decay)
    return training.fit(model, train_loader, val_loader, optimizer, epochs,
                        **fit_kwargs)


# -------------------------------------------------- compare strategies


class _PeakMemory:
    """Peak memory growth of a block, in MB.

    On CUDA: torch.cuda.max_memory_allocated above the allocation at the
    start (tensors only). Elsewhere: the bytes the process holds from
    malloc (glibc; resident memory elsewhere), sampled every 5 ms by
    kernels.HeapSampler, minus their value at the start. Resident memory
    alone would miss a block that reuses memory freed by an earlier run.
    """

    def __init__(self, device):
        self.device = device
        self.mb = None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._sampler = kernels.HeapSampler(interval=0.005).start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            growth = (torch.cuda.max_memory_allocated(self.device)
                      - self._base)
        else:
            self._sampler.stop()
            growth = self._sampler.growth_bytes
        self.mb = max(0.0, growth / 2 ** 20)
        return False


def _num_classes(dataset):
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return int(max(int(t) for t in targets)) + 1


def _build_model(model, weights, num_classes):
    from tlhelpers import models

    if isinstance(model, str):
        return models.load_pretrained(model, num_classes=num_classes,
                                      weights=weights)
    if callable(model):
        return model(weights)
    raise TypeError("model must be a name from MODEL_NAMES or a function "
                    f"weights -> model, got {type(model).__name__}")


@dataclass(frozen=True)
class _Budget:
    epochs: int
    lr: float
    batch_size: int
    last_k: int
    probe: str
    warmup_epochs: int
    lr_mult: float
    schedule: object
    bn_stats: str


def _run_strategy(strategy, model, train, test, num_classes, budget, seed,
                  device):
    """Train one strategy; return (accuracy, trainable parameters)."""
    import torch

    from tlhelpers import config, features, models, training

    config.seed_everything(seed)
    b = budget
    if strategy == "feature_extraction":
        net = _build_model(model, "imagenet", num_classes)
        backbone = (net if isinstance(net, models.Pretrained)
                    else models.feature_extractor(net))
        kw = dict(batch_size=b.batch_size, cache=False, device=device,
                  progress=False)
        result = features.linear_probe(
            features.extract_features(backbone, train, **kw),
            features.extract_features(backbone, test, **kw), method=b.probe)
        dim = models.feature_dim(net)
        return result.accuracy, dim * num_classes + num_classes
    weights = None if strategy == "from_scratch" else "imagenet"
    net = _build_model(model, weights, num_classes)
    loader = torch.utils.data.DataLoader(
        train, batch_size=b.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed))
    quiet = dict(device=device, progress=False, keep_best=False)
    if strategy == "fine_tuning":
        fine_tune(net, loader, None, b.epochs, b.lr, b.warmup_epochs,
                  b.lr_mult, b.schedule, b.bn_stats, **quiet)
    elif strategy == "naive_fine_tuning":
        naive_fine_tune(net, loader, None, b.epochs, b.lr, **quiet)
    else:
        unfreezing = None
        if strategy == "head_only":
            models.freeze(net, bn_stats=b.bn_stats)
        elif strategy == "last_k":
            models.freeze_to(net, -b.last_k, bn_stats=b.bn_stats)
        elif strategy == "gradual_unfreezing":
            models.freeze(net, bn_stats=b.bn_stats)
            unfreezing = training.GradualUnfreezing(
                list(models.layer_groups(net))[::-1][:b.epochs], lr=b.lr,
                bn_stats=b.bn_stats)
        else:  # from scratch: random statistics must follow the data
            models.unfreeze(net, bn_stats="train")
        optimizer = (unfreezing.make_optimizer(net) if unfreezing
                     else models.make_optimizer(net, lr=b.lr))
        training.fit(net, loader, None, optimizer, b.epochs,
                     unfreezing=unfreezing, **quiet)
    test_loader = torch.utils.data.DataLoader(test, batch_size=b.batch_size)
    accuracy = training.evaluate(net, test_loader, device=device)["accuracy"]
    return accuracy, models.count_parameters(net, trainable_only=True)


def _check_seeds(seeds):
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                            for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints, e.g. "
                         f"[0, 1, 2], got {seeds!r}")
    return seeds


def compare_strategies(train: Any, test: Any,
                       model: str = "efficientnet_lite0",
                       strategies: Sequence[str] = NAMES, epochs: int = 5,
                       lr: float = 1e-3, batch_size: int = 32,
                       last_k: int = 2,
                       labels_per_class: Sequence[int] | None = None,
                       probe: str = "logistic", seed: int = 0,
                       seeds: Sequence[int] | None = None,
                       warmup_epochs: int = WARMUP_EPOCHS,
                       lr_mult: float = LR_MULT, schedule: str | None = None,
                       bn_stats: str = BN_STATS_DEFAULT, device: Any = None,
                       progress: bool | None = None) -> Table:
    """Train strategies on the same data and budget; tabulate, over seeds.

    Args:
        train, test: datasets of (preprocessed tensor, label).
        model: a name for load_pretrained, or a function weights -> model
            (weights is "imagenet" or None) returning a model whose head
            already has the right number of classes.
        strategies: names from STRATEGIES (see describe()). All training
            runs use AdamW at `lr` for `epochs` epochs; fine_tuning adds
            warmup_epochs, lr_mult and schedule (see fine_tune); bn_stats
            is the BatchNorm policy of every pretrained run except
            naive_fine_tuning (statistics follow the batches).
        labels_per_class: a list of labelled images per class (e.g.
            [5, 10, 20]) to repeat the comparison on few-shot subsets of
            `train` (drawn per seed), for learning curves.
        seeds: run every configuration once per seed, e.g. [0, 1, 2];
            default [seed] (one run, for speed).

    Returns:
        Table with one row per (labels_per_class,) strategy: accuracy (the
        mean over seeds), accuracy_min, accuracy_max, seeds (how many),
        trainable_params, seconds (mean wall time, training and testing)
        and peak_mem_mb (the largest; on CUDA peak tensor memory, on CPU
        the peak growth of the process's malloc'd memory, sampled).
        table.runs holds one row per run with its seed.
    """
    from tqdm.auto import tqdm

    from tlhelpers import config, models

    progress = config.show_progress(progress)

    for name in strategies:
        check_strategy(name)
    seeds = _check_seeds([seed] if seeds is None else seeds)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of "
                         f"{SCHEDULES}")
    models.check_bn_stats(bn_stats)
    budget = _Budget(epochs, lr, batch_size, last_k, probe, warmup_epochs,
                     lr_mult, schedule, bn_stats)
    device = config.get_device(device)
    num_classes = _num_classes(train)
    sizes = [None] if labels_per_class is None else list(labels_per_class)
    runs = []
    bar = tqdm(total=len(seeds) * len(sizes) * len(strategies),
               desc="strategies", unit="run", disable=not progress)
    try:
        for run_seed in seeds:
            for k in sizes:
                subset = train
                if k is not None:
                    from tlhelpers.data import few_shot

                    subset = few_shot(train, k, seed=run_seed)
                for strategy in strategies:
                    bar.set_postfix(strategy=strategy, refresh=True)
                    start = time.perf_counter()
                    with _PeakMemory(device) as mem:
                        accuracy, trainable = _run_strategy(
                            strategy, model, subset, test, num_classes,
                            budget, run_seed, device)
                    runs.append({
                        "labels_per_class": k, "strategy": strategy,
                        "seed": run_seed, "accuracy": accuracy,
                        "trainable_params": trainable,
                        "seconds": time.perf_counter() - start,
                        "peak_mem_mb": mem.mb})
                    bar.update()
    finally:
        bar.close()
    return _summarise(runs, sizes, strategies, epochs, lr, last_k,
                      len(seeds))


def _summarise(runs, sizes, strategies, epochs, lr, last_k, n_seeds):
    from tlhelpers.display import Table

    rows = []
    for k in sizes:
        for strategy in strategies:
            mine = [r for r in runs if r["labels_per_class"] == k
                    and r["strategy"] == strategy]
            accs = [r["accuracy"] for r in mine]
            row = {} if k is None else {"labels_per_class": k}
            row.update(
                strategy=(f"last_{last_k}_groups" if strategy == "last_k"
                          else strategy),
                accuracy=sum(accs) / len(accs), accuracy_min=min(accs),
                accuracy_max=max(accs), seeds=len(accs),
                trainable_params=mine[0]["trainable_params"],
                seconds=sum(r["seconds"] for r in mine) / len(mine),
                peak_mem_mb=max(r["peak_mem_mb"] for r in mine))
            rows.append(row)
    seeds = f", {n_seeds} seeds" if n_seeds > 1 else ""
    table = Table(rows, title=f"Transfer strategies ({epochs} epochs, lr "
                              f"{lr:g}{seeds})")
    table.runs = Table(runs, title="Every run")
    return table


def spread(table: Iterable[dict], strategy: str,
           labels_per_class: int | None = None
           ) -> tuple[float, float, float]:
    """Return (mean, min, max) accuracy of one strategy in a table."""
    for row in table:
        if (row["strategy"] == strategy
                and row.get("labels_per_class") == labels_per_class):
            return row["accuracy"], row["accuracy_min"], row["accuracy_max"]
    raise ValueError(f"the table has no row for {strategy!r} at "
                     f"labels_per_class={labels_per_class}")
