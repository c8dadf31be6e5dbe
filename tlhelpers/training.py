"""Training loop, history, gradual unfreezing and the LR finder.

``fit`` is the loop every notebook uses. It keeps its metrics on the device
and reads them once per epoch (plus about twice a second for the progress
bar and the NaN check), so it costs no more than a bare PyTorch loop.
Epochs are numbered from 1 everywhere: in ``History``, in unfreezing
schedules and in checkpoints.
"""

import contextlib
import copy
import math
import random
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tlhelpers import config, files, models
from tlhelpers.data import check_int
from tlhelpers.display import Table

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")
# How often (seconds) fit reads the running loss back from the device: for
# the progress bar and to notice a NaN loss without a sync on every step.
SYNC_SECONDS = 0.5
CHECKPOINT_FORMAT = "tlhelpers-checkpoint-2"


# ------------------------------------------------------------- history


def _lower_is_better(monitor):
    return "loss" in monitor


def _improved(value, best, monitor, min_delta=0.0):
    if best is None:
        return True
    if _lower_is_better(monitor):
        return value < best - min_delta
    return value > best + min_delta


def _check_monitor(monitor):
    if monitor not in METRICS:
        raise ValueError(f"cannot monitor {monitor!r}: choose one of "
                         f"{', '.join(METRICS)}")


class History:
    """What fit() measured, epoch by epoch, and what happened on the way.

    ``epochs`` holds one dict per finished epoch: epoch, train_loss,
    train_acc, val_loss, val_acc, lrs ({parameter group name: learning
    rate at the start of the epoch}) and time (seconds). ``events`` lists
    unfreezing events (epoch, kind, group, lr); ``notes`` says in words
    what else happened (early stop, restored weights, an interruption).
    ``history["val_acc"]`` gives one metric as a list.
    """

    def __init__(self, monitor: str = "val_loss",
                 epochs: Iterable[Mapping] = (),
                 events: Iterable[Mapping] = (),
                 notes: Iterable[str] = ()):
        _check_monitor(monitor)
        self.monitor = monitor
        self.epochs = [dict(row) for row in epochs]
        self.events = [dict(event) for event in events]
        self.notes = list(notes)

    def __len__(self):
        return len(self.epochs)

    def __getitem__(self, key):
        if not isinstance(key, str):
            return self.epochs[key]
        if self.epochs and key not in self.epochs[0]:
            raise KeyError(f"history has no {key!r}; it has "
                           f"{', '.join(self.epochs[0])}")
        return [row.get(key) for row in self.epochs]

    @property
    def best_epoch(self) -> int | None:
        """Return the epoch with the best monitored value (None if none)."""
        best_epoch, best = None, None
        for row in self.epochs:
            value = row.get(self.monitor)
            if value is None or not math.isfinite(value):
                continue
            if _improved(value, best, self.monitor):
                best_epoch, best = row["epoch"], value
        return best_epoch

    def to_dict(self) -> dict:
        """Return plain data (for checkpoints and JSON)."""
        return {"monitor": self.monitor, "epochs": self.epochs,
                "events": self.events, "notes": self.notes}

    @classmethod
    def from_dict(cls, data: Mapping) -> "History":
        """Rebuild a History from to_dict() output."""
        return cls(data["monitor"], data["epochs"], data["events"],
                   data["notes"])

    def table(self) -> Table:
        """Tabulate the epochs: metrics, learning rates, unfrozen groups."""
        unfrozen: dict[int, list[str]] = {}
        for event in self.events:
            unfrozen.setdefault(event["epoch"], []).append(event["group"])
        best = self.best_epoch
        rows = []
        for row in self.epochs:
            out = {k: row.get(k) for k in ("epoch",) + METRICS}
            for name, lr in row.get("lrs", {}).items():
                # the "+no_decay" twin always shares its group's rate
                if not name.endswith("+no_decay"):
                    out[f"lr {name}"] = lr
            out["time"] = row.get("time")
            if unfrozen:
                out["unfrozen"] = ", ".join(unfrozen.get(row["epoch"], []))
            out["best"] = "*" if row["epoch"] == best else ""
            rows.append(out)
        return Table(rows, title=f"Training history (best: {self.monitor})")

    def __str__(self):
        text = str(self.table())
        return "\n".join([text] + [f"note: {n}" for n in self.notes])

    def __repr__(self):
        return (f"History({len(self.epochs)} epochs, best_epoch="
                f"{self.best_epoch}, monitor={self.monitor!r})")

    def _repr_html_(self):
        import html

        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return self.table()._repr_html_() + notes


@dataclass
class EarlyStopping:
    """Stop when `monitor` has not improved for `patience` epochs.

    An improvement must beat the best value so far by more than min_delta.
    """

    patience: int = 3
    monitor: str = "val_loss"
    min_delta: float = 0.0

    def __post_init__(self):
        check_int(self.patience, "patience", low=1,
                  why=" (epochs to wait for an improvement)")
        _check_monitor(self.monitor)
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    def epochs_without_improvement(self, history: History) -> int:
        """Count the epochs since the monitored value last improved."""
        best, wait = None, 0
        for value in history[self.monitor]:
            if (value is not None and math.isfinite(value)
                    and _improved(value, best, self.monitor, self.min_delta)):
                best, wait = value, 0
            else:
                wait += 1
        return wait

    def should_stop(self, history: History) -> bool:
        """Say whether patience has run out."""
        return self.epochs_without_improvement(history) >= self.patience


def _as_stopper(early_stopping):
    if early_stopping is None or isinstance(early_stopping, EarlyStopping):
        return early_stopping
    if isinstance(early_stopping, int):  # EarlyStopping refuses a bool
        return EarlyStopping(patience=early_stopping)
    raise TypeError("early_stopping must be a patience in epochs (an int) "
                    "or EarlyStopping(patience=..., monitor=...), got "
                    f"{early_stopping!r}")


# ------------------------------------------------------------ helpers


def _named_lrs(optimizer):
    lrs = {}
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name") or f"group{i}"
        if name in lrs:
            name = f"{name}#{i}"
        lrs[name] = float(group["lr"])
    return lrs


def _lr_text(optimizer):
    lrs = {n.split("+")[0]: lr for n, lr in _named_lrs(optimizer).items()}
    if len(set(lrs.values())) == 1:
        return f"learning rate {next(iter(lrs.values())):.2e}"
    return "learning rates " + ", ".join(f"{n}={lr:.2e}"
                                         for n, lr in lrs.items())


def _copy_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _trainable(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]
            if p.requires_grad]


def _freezing_state(net):
    """What a checkpoint needs to rebuild freezing: policy and groups."""
    return {"bn_stats": models.bn_stats_policy(net),
            "trainable": [bool(t) for t in models.group_status(net).values()],
            "requires_grad": [p.requires_grad for p in net.parameters()]}


def _restore_freezing(net, state):
    trainable = state["trainable"]
    if state["bn_stats"] is not None:
        models.freeze_to(net, trainable.index(True) if True in trainable
                         else len(trainable), bn_stats=state["bn_stats"])
    for p, flag in zip(net.parameters(), state["requires_grad"]):
        p.requires_grad_(flag)


def _check_something_trains(optimizer, epoch):
    if not _trainable(optimizer):
        raise ValueError(
            f"nothing trains in epoch {epoch}: every parameter in the "
            "optimizer is frozen. Unfreeze at least the head (freeze(model) "
            "keeps it trainable) or schedule it with GradualUnfreezing.")


def _per_batch(scheduler):
    # One-cycle and cyclic schedules count batches; the others count epochs.
    return isinstance(scheduler, (torch.optim.lr_scheduler.OneCycleLR,
                                  torch.optim.lr_scheduler.CyclicLR))


def _is_plateau(scheduler):
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _classifies(out, y):
    return out.ndim == 2 and y.ndim == 1 and not y.is_floating_point()


def _loader_generators(loader):
    found = []
    for owner in (loader, getattr(loader, "sampler", None),
                  getattr(loader, "batch_sampler", None),
                  getattr(getattr(loader, "batch_sampler", None), "sampler",
                          None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g
                                                    for g in found):
            found.append(gen)
    return found


def _rng_state(loader=None):
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                       has_gauss, gauss),
             "torch": torch.get_rng_state(),
             "cuda": (torch.cuda.get_rng_state_all()
                      if torch.cuda.is_available() else []),
             "loader": [g.get_state() for g in
                        (_loader_generators(loader) if loader else [])]}
    return state


def _set_rng_state(state, loader=None):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos,
                         has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gens = _loader_generators(loader) if loader else []
    for gen, saved in zip(gens, state["loader"]):
        gen.set_state(saved)


class _Diverged(Exception):
    def __init__(self, epoch, batch, value):
        super().__init__(epoch, batch, value)
        self.epoch, self.batch, self.value = epoch, batch, value


def _step(net, x, y, optimizer, loss_fn, scaler, clip_grad, device):
    """One optimisation step; return (outputs, loss) still on the device."""
    autocast = (torch.autocast(device.type, dtype=torch.float16)
                if scaler is not None else contextlib.nullcontext())
    # Free the old gradients before the forward pass, as a plain loop
    # does: the activations can then reuse their memory.
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        out = net(x)
        loss = loss_fn(out, y)
    if scaler is None:
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_(_trainable(optimizer), clip_grad)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(_trainable(optimizer), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    return out, loss


def _train_epoch(net, loader, optimizer, loss_fn, device, scheduler, scaler,
                 clip_grad, bar, epoch):
    """Train one epoch; return (loss, accuracy) as floats."""
    net.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = counted = 0
    each_batch = _per_batch(scheduler)
    next_sync = time.monotonic() + SYNC_SECONDS
    for batch, (x, y) in enumerate(loader, start=1):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        out, loss = _step(net, x, y, optimizer, loss_fn, scaler, clip_grad,
                          device)
        if each_batch:
            scheduler.step()
        # Accumulate on the device: reading a value back every step would
        # make the GPU wait for the CPU.
        size = len(y)
        with torch.no_grad():
            loss_sum.add_(loss, alpha=size)
            if _classifies(out, y):
                correct.add_((out.argmax(1) == y).sum())
                counted += size
        seen += size
        bar.update()
        if time.monotonic() >= next_sync:
            running = loss_sum.item() / seen
            if not math.isfinite(running):
                raise _Diverged(epoch, batch, running)
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            next_sync = time.monotonic() + SYNC_SECONDS
    if seen == 0:
        raise ValueError("the training loader yielded no batches: is the "
                         "dataset empty, or drop_last=True with fewer "
                         "samples than batch_size?")
    train_loss = loss_sum.item() / seen
    if not math.isfinite(train_loss):
        raise _Diverged(epoch, batch, train_loss)
    train_acc = correct.item() / counted if counted else None
    return train_loss, train_acc


@torch.inference_mode()
def _eval_loop(net, loader, loss_fn, device):
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = counted = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        out = net(x)
        size = len(y)
        loss_sum += loss_fn(out, y).float() * size
        seen += size
        if _classifies(out, y):
            correct += (out.argmax(1) == y).sum()
            counted += size
    if seen == 0:
        raise ValueError("the evaluation loader yielded no batches: is the "
                         "dataset empty?")
    return loss_sum.item() / seen, (correct.item() / counted if counted
                                    else None)


def evaluate(model: models.Model, loader: Iterable,
             loss_fn: nn.Module | None = None,
             device: str | torch.device | None = None) -> dict:
    """Return the mean loss and accuracy of a model over a loader.

    Returns:
        dict(loss=float, accuracy=float in [0, 1], or None when the
        outputs are not class scores).
    """
    net = models.as_module(model)
    device = config.get_device(device)
    net.to(device)
    with models.eval_mode(net):
        loss, acc = _eval_loop(net, loader, loss_fn or nn.CrossEntropyLoss(),
                               device)
    return {"loss": loss, "accuracy": acc}


@dataclass
class Predictions:
    """Predicted classes, class probabilities and (if known) true labels."""

    preds: torch.Tensor
    probs: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self):
        return len(self.preds)

    @property
    def accuracy(self) -> float | None:
        """Return the share of correct predictions (None without targets)."""
        if self.targets is None:
            return None
        return (self.preds == self.targets).float().mean().item()


def predict(model: models.Model, data: DataLoader | Dataset | torch.Tensor,
            device: str | torch.device | None = None,
            batch_size: int = 64) -> Predictions:
    """Predict classes for a DataLoader, a Dataset or a batch tensor.

    Returns:
        Predictions: preds [N] (int64), probs [N, classes] (softmax) and
        targets [N] when the data carries labels, all on the CPU.
    """
    net = models.as_module(model)
    device = config.get_device(device)
    net.to(device)
    batches: Iterable
    if isinstance(data, torch.Tensor):
        batches = [(chunk, None) for chunk in data.split(batch_size)]
    elif isinstance(data, torch.utils.data.DataLoader):
        batches = data
    elif isinstance(data, torch.utils.data.Dataset):
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size)
    else:
        raise TypeError("predict needs a DataLoader, a Dataset or a tensor "
                        f"batch, got {type(data).__name__}")
    chunks: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    with models.eval_mode(net), torch.inference_mode():
        for item in batches:
            x, y = item if isinstance(item, (tuple, list)) else (item, None)
            chunks.append(net(x.to(device)).float().softmax(-1).cpu())
            if y is not None:
                targets.append(torch.as_tensor(y))
    probs = torch.cat(chunks)
    return Predictions(preds=probs.argmax(1), probs=probs,
                       targets=torch.cat(targets) if targets else None)


# -------------------------------------------------------------- fit


@dataclass
class _Run:
    """What one fit() call carries from epoch to epoch."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    train_loader: Iterable
    history: History
    keep_best: bool
    checkpoint: str | Path | None
    best_state: dict | None = None
    stopped: bool = False


def _check_fit_args(epochs, optimizer, clip_grad, resume, checkpoint,
                    live):
    check_int(epochs, "epochs", low=1)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer must be a torch optimizer, e.g. "
                        "make_optimizer(model, lr=1e-3), got "
                        f"{type(optimizer).__name__}")
    if clip_grad is not None and not clip_grad > 0:
        raise ValueError(f"clip_grad must be > 0 (a maximum gradient norm), "
                         f"got {clip_grad}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path> to resume from")
    if live is not None and not callable(getattr(live, "update", None)):
        raise TypeError("live must have an update(history) method, got "
                        f"{type(live).__name__}")


def _monitor(stopper, val_loader):
    """Return the metric that early stopping and keep_best watch."""
    monitor = stopper.monitor if stopper else "val_loss"
    if val_loader is None and monitor.startswith("val_"):
        if stopper:
            raise ValueError(f"early stopping watches {monitor!r} but there "
                             "is no val_loader: pass one, or use "
                             "EarlyStopping(monitor='train_loss')")
        monitor = "train_loss"
    return monitor


def _grad_scaler(amp, device):
    """Return a GradScaler for mixed precision on CUDA, else None."""
    if amp and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    if amp:
        warnings.warn(f"amp=True needs a CUDA GPU; training in float32 on "
                      f"{device.type}", stacklevel=3)
    return None


def _read_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read the checkpoint {path}: {err}. Delete "
                         "it or pass resume=False to start over.") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by fit(); "
                         "pass another checkpoint path or resume=False")
    return ckpt


def _resume(run):
    """Load run.checkpoint into the run; return the epoch to start from."""
    path = run.checkpoint
    ckpt = _read_checkpoint(path)
    try:
        _restore_freezing(run.net, ckpt["freezing"])
        run.net.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.scheduler is not None and ckpt["scheduler"] is not None:
            run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.scaler is not None and ckpt["scaler"] is not None:
            run.scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"the checkpoint {path} does not fit this model, optimizer or "
            f"scheduler ({err}). Use another checkpoint path, delete the "
            "file, or pass resume=False.") from err
    run.history = History.from_dict(ckpt["history"])
    run.stopped, run.best_state = ckpt["stopped"], ckpt["best_state"]
    _set_rng_state(ckpt["rng"], run.train_loader)
    run.history.notes.append(f"resumed from {path} after epoch "
                             f"{ckpt['epoch']}")
    return ckpt["epoch"] + 1


def _save_checkpoint(run, epoch):
    """Write everything a later fit(resume=True) needs, atomically."""
    history = run.history
    files.save({
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "stopped": run.stopped,
        "model": run.net.state_dict(), "freezing": _freezing_state(run.net),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": (run.scheduler.state_dict()
                      if run.scheduler is not None else None),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "history": history.to_dict(),
        # The best weights only when they differ from the last.
        "best_state": (run.best_state if run.keep_best
                       and history.best_epoch != epoch else None),
        "rng": _rng_state(run.train_loader)}, run.checkpoint)


def _validate(net, loader, loss_fn, device, epoch):
    """Return the validation (loss, accuracy); raise if the loss is NaN."""
    net.eval()
    val_loss, val_acc = _eval_loop(net, loader, loss_fn, device)
    if not math.isfinite(val_loss):
        raise _Diverged(epoch, None, val_loss)
    return val_loss, val_acc


def _end_epoch(run, row, stopper):
    """Step the epoch's scheduler, record the epoch, keep the best weights,
    decide on early stopping and write the checkpoint."""
    scheduler, history = run.scheduler, run.history
    if scheduler is not None and not _per_batch(scheduler):
        if _is_plateau(scheduler):
            scheduler.step(row["train_loss"] if row["val_loss"] is None
                           else row["val_loss"])
        else:
            scheduler.step()
    history.epochs.append(row)
    epoch = row["epoch"]
    if run.keep_best and history.best_epoch == epoch:
        run.best_state = _copy_state(run.net)
    if stopper is not None and stopper.should_stop(history):
        run.stopped = True
        history.notes.append(
            f"stopped early after epoch {epoch}: {history.monitor} did not "
            f"improve for {stopper.patience} epochs")
    if run.checkpoint is not None:
        _save_checkpoint(run, epoch)


def _restore_best(run):
    """Load the best weights if kept; say what happened, in words."""
    if not run.keep_best:
        return "kept the current weights"
    run.net.load_state_dict(run.best_state)
    history, monitor = run.history, run.history.monitor
    best = history.best_epoch
    if best is None:
        return "restored the weights from the start of fit()"
    value = next(r[monitor] for r in history.epochs if r["epoch"] == best)
    return (f"restored the weights of epoch {best} (best {monitor} "
            f"{value:.4g})")


def _finish(run):
    """End on the best epoch's weights, if another epoch was better."""
    best, history = run.history.best_epoch, run.history
    if run.keep_best and best is not None and best != history[-1]["epoch"]:
        history.notes.append(f"finished after epoch "
                             f"{history[-1]['epoch']}; {_restore_best(run)}")


def _interrupted(run, progress):
    """Note a Ctrl-C: restore the best weights and say how to continue."""
    done = len(run.history)
    note = (f"interrupted (Ctrl-C) after {done} finished epoch"
            f"{'s' if done != 1 else ''}; {_restore_best(run)}")
    if run.checkpoint is not None:
        note += f"; continue with resume=True from {run.checkpoint}"
    run.history.notes.append(note)
    if progress:
        print(note)


def _divergence_error(err, run):
    """Turn a NaN loss into a FloatingPointError that says what to do."""
    optimizer = run.optimizer
    where = ("during validation" if err.batch is None
             else f"by batch {err.batch}")
    top = max(g["lr"] for g in optimizer.param_groups)
    restored = _restore_best(run)
    error = FloatingPointError(
        f"the loss became {err.value} in epoch {err.epoch} ({where}) with "
        f"{_lr_text(optimizer)}. The steps are too large and the weights "
        f"blew up: try a lower learning rate, e.g. {top / 10:.2e} (10x "
        "lower), or pick one with lr_find(model, train_loader). Training "
        f"stopped and {restored}.")
    error.history = run.history
    return error


def _show_epoch(bar, row):
    """Advance the epochs bar and show the epoch's losses on it."""
    bar.update()
    bar.set_postfix({k: f"{row[k]:.4f}" for k in (
        "train_loss", "val_loss", "val_acc") if row[k] is not None})


def _batch_count(loader):
    try:
        return len(loader)
    except TypeError:
        return None


def fit(model: models.Model, train_loader: Iterable,
        val_loader: Iterable | None, optimizer: torch.optim.Optimizer,
        epochs: int, scheduler: Any = None, loss_fn: nn.Module | None = None,
        device: str | torch.device | None = None,
        progress: bool | None = None, clip_grad: float | None = None,
        early_stopping: int | EarlyStopping | None = None,
        keep_best: bool = True, checkpoint: str | Path | None = None,
        resume: bool = False, unfreezing: "GradualUnfreezing | None" = None,
        live: Any = None, amp: bool = False) -> History:
    """Train a model for some epochs and return its History.

    Args:
        model: an nn.Module or the Pretrained from load_pretrained.
        val_loader: None skips validation (then keep_best watches the
            training loss).
        epochs: the total number of epochs, also when resuming.
        scheduler: a torch LR scheduler; OneCycleLR and CyclicLR step
            every batch, ReduceLROnPlateau steps every epoch on the
            validation loss, every other scheduler steps every epoch.
        clip_grad: clip the gradient norm to this value.
        early_stopping: a patience in epochs, or EarlyStopping(...).
        keep_best: end with the weights of the best epoch (by the early
            stopping monitor, else the validation loss).
        checkpoint: a file written (atomically) after every epoch with
            everything needed to continue: weights, which groups train,
            the BatchNorm policy, optimizer, scheduler, history and random
            states.
        resume: continue from `checkpoint` if it exists, so that the run
            ends exactly as if it had never stopped.
        unfreezing: a GradualUnfreezing schedule: its freeze_to calls run
            at epoch starts; the optimizer must hold every group from the
            start (unfreezing.make_optimizer(model) builds one).
        live: an object with update(history) (and optionally close()),
            called after every epoch, e.g. a live plot.
        amp: mixed precision (float16) on a CUDA GPU; ignored elsewhere.

    A NaN or infinite loss raises FloatingPointError (with .history).
    Ctrl-C stops training, restores the best weights and returns the
    history so far.
    """
    progress = config.show_progress(progress)
    net = models.as_module(model)
    _check_fit_args(epochs, optimizer, clip_grad, resume, checkpoint, live)
    stopper = _as_stopper(early_stopping)
    history = History(_monitor(stopper, val_loader))
    if unfreezing is not None:
        unfreezing.check_optimizer(net, optimizer)
    device = config.get_device(device)
    net.to(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    run = _Run(net, optimizer, scheduler, _grad_scaler(amp, device),
               train_loader, history, keep_best, checkpoint)
    resuming = resume and checkpoint is not None and Path(checkpoint).exists()
    start = _resume(run) if resuming else 1
    if keep_best and run.best_state is None:
        # the best so far is what we start from (also the NaN fallback)
        run.best_state = _copy_state(net)
    outer = tqdm(total=epochs, initial=start - 1, desc="fit", unit="epoch",
                 disable=not progress)
    inner = None
    try:
        for epoch in range(start, epochs + 1):
            if run.stopped:
                break
            t0 = time.perf_counter()
            if unfreezing is not None:
                run.history.events += unfreezing.apply(net, epoch)
            _check_something_trains(optimizer, epoch)
            lrs = _named_lrs(optimizer)
            inner = tqdm(total=_batch_count(train_loader), unit="batch",
                         desc=f"epoch {epoch}/{epochs}", leave=False,
                         disable=not progress)
            train_loss, train_acc = _train_epoch(
                net, train_loader, optimizer, loss_fn, device, scheduler,
                run.scaler, clip_grad, inner, epoch)
            inner.close()
            val_loss = val_acc = None
            if val_loader is not None:
                val_loss, val_acc = _validate(net, val_loader, loss_fn,
                                              device, epoch)
            _end_epoch(run, {
                "epoch": epoch, "train_loss": train_loss,
                "train_acc": train_acc, "val_loss": val_loss,
                "val_acc": val_acc, "lrs": lrs,
                "time": time.perf_counter() - t0}, stopper)
            _show_epoch(outer, run.history[-1])
            if live is not None:
                live.update(run.history)
        _finish(run)
    except KeyboardInterrupt:
        _interrupted(run, progress)
    except _Diverged as err:
        raise _divergence_error(err, run) from None
    finally:
        if inner is not None:
            inner.close()
        outer.close()
        if live is not None and callable(getattr(live, "close", None)):
            live.close()
    return run.history


# --------------------------------------------------- gradual unfreezing


class GradualUnfreezing:
    """Unfreeze layer groups one after another, from the head down (ULMFiT).

    Args:
        schedule: {group: epoch} or {group: (epoch, lr)}, head first; or a
            list of group names in unfreezing order, one every `every`
            epochs starting at epoch 1. Epochs count from 1, as in
            History. The head is added at epoch 1 if not named.
        lr: the head's learning rate; each group further down gets the
            rate of the group above divided by `factor` (ULMFiT: 2.6),
            unless the schedule gives its own rate.
        train_bn: let the BatchNorm layers of frozen groups train their
            scale and shift (see models.freeze_to).
        weight_decay: for make_optimizer.
        bn_stats: the BatchNorm statistics policy (models.BN_STATS); None
            keeps the model's.

    The schedule is a series of freeze_to calls: at each epoch start, fit
    calls apply(), which unfreezes the groups due and freezes the rest.
    The optimizer holds every group from the start at its rate
    (make_optimizer(model) builds it), so unfreezing changes no optimizer
    or scheduler state and one-cycle or cosine schedules run across it.
    """

    def __init__(self, schedule: Mapping | Sequence[str], lr: float,
                 factor: float = 2.6, every: int = 1, train_bn: bool = False,
                 weight_decay: float = 0.01, bn_stats: str | None = None):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not factor >= 1:
            raise ValueError(f"factor must be >= 1 (each lower group's rate "
                             f"is divided by it), got {factor}")
        check_int(every, "every", low=1)
        if bn_stats is not None:
            models.check_bn_stats(bn_stats)
        if isinstance(schedule, dict):
            items = list(schedule.items())
            if "head" not in schedule:
                items.insert(0, ("head", 1))
        elif isinstance(schedule, (list, tuple)) and all(
                isinstance(g, str) for g in schedule):
            names = list(schedule)
            if "head" not in names:
                names.insert(0, "head")
            items = [(g, 1 + i * every) for i, g in enumerate(names)]
        else:
            raise TypeError("schedule must be a dict {group: epoch} or a "
                            "list of group names (head first), got "
                            f"{schedule!r}")
        plan: list[tuple[str, int, float]] = []
        last = 1
        for rank, (group, when) in enumerate(items):
            epoch, rate = when if isinstance(when, tuple) else (when, None)
            if not isinstance(epoch, int) or epoch < 1:
                raise ValueError(f"group {group!r} is scheduled at epoch "
                                 f"{epoch!r}: epochs count from 1")
            if epoch < last:
                raise ValueError(
                    f"groups unfreeze from the head down: {group!r} (epoch "
                    f"{epoch}) cannot unfreeze before {plan[-1][0]!r} "
                    f"(epoch {plan[-1][1]})")
            last = epoch
            plan.append((group, epoch,
                         float(rate) if rate else lr / factor ** rank))
        if plan[0][1] != 1:
            raise ValueError(f"the head ({plan[0][0]!r}) must train from "
                             f"epoch 1, not epoch {plan[0][1]}")
        self.plan = tuple(plan)
        self.lr, self.factor = lr, factor
        self.train_bn, self.weight_decay = train_bn, weight_decay
        self.bn_stats = bn_stats

    def timeline(self) -> list[tuple[str, int, float]]:
        """Return [(group, start_epoch, lr)], head first (for plots)."""
        return list(self.plan)

    def table(self) -> Table:
        """Tabulate which group unfreezes at which epoch with which rate."""
        return Table([{"group": g, "unfreezes at epoch": e, "lr": lr}
                      for g, e, lr in self.plan],
                     title="Gradual unfreezing schedule")

    def __repr__(self):
        return str(self.table())

    def _repr_html_(self):
        return self.table()._repr_html_()

    def trainable_groups(self, epoch: int) -> list[str]:
        """Return the names of the groups that train during `epoch`."""
        return [g for g, e, _ in self.plan if e <= epoch]

    def _check(self, names):
        for group, _, _ in self.plan:
            if group not in names:
                raise ValueError(f"unknown layer group {group!r} in the "
                                 "unfreezing schedule; this model's groups "
                                 f"are {', '.join(names)}")
        expected = names[::-1][:len(self.plan)]
        got = [g for g, _, _ in self.plan]
        if got != expected:
            raise ValueError(
                "the unfreezing schedule must name groups from the head "
                f"down without gaps: expected {expected}, got {got}")

    def rates(self, model: models.Model) -> dict[str, float]:
        """Return {group: lr} for every group of the model.

        Scheduled groups get their planned rate; groups never unfrozen get
        the ULMFiT rate for their position (they train only with
        train_bn=True).
        """
        names = list(models.layer_groups(model))
        self._check(names)
        planned = {g: lr for g, _, lr in self.plan}
        return {name: planned.get(name, self.lr / self.factor ** (
            len(names) - 1 - i)) for i, name in enumerate(names)}

    def make_optimizer(self, model: models.Model, kind: str = "adamw",
                       **kwargs: Any) -> torch.optim.Optimizer:
        """Create an optimizer over every group at the schedule's rates."""
        kwargs.setdefault("weight_decay", self.weight_decay)
        return models.make_optimizer(model, lr=self.lr, kind=kind,
                                     lrs=self.rates(model), **kwargs)

    def check_optimizer(self, model: models.Model,
                        optimizer: torch.optim.Optimizer) -> None:
        """Raise if the optimizer lacks a scheduled group's parameters."""
        net = models.as_module(model)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        groups = models.layer_groups(net)
        self._check(list(groups))
        missing = [g for g, _, _ in self.plan
                   if any(id(p) not in held
                          for p in models.group_parameters(groups[g]))]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the groups "
                f"{', '.join(missing)}, so they could never train after "
                "they unfreeze. Build it with every group from the start: "
                "optimizer = unfreezing.make_optimizer(model)")
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups
                 for p in g["params"]}
        plan_head, head = self.plan[0][2], self.plan[0][0]

        def rate(group):
            return lr_of[id(models.group_parameters(groups[group])[0])]

        off = [g for g, _, lr in self.plan
               if not math.isclose(rate(g) * plan_head, lr * rate(head),
                                   rel_tol=1e-6)]
        if off:
            warnings.warn(
                f"the optimizer's rates for {', '.join(off)} do not follow "
                "the schedule's rates (relative to the head), so those "
                "groups train at other rates than unfreezing.table() says. "
                "Build it with optimizer = unfreezing.make_optimizer(model)",
                stacklevel=3)

    def apply(self, model: models.Model, epoch: int) -> list[dict]:
        """Freeze the model as scheduled for `epoch`; return its events.

        One freeze_to call: the groups due by `epoch` train, the others
        are frozen. The optimizer is left alone.
        """
        net = models.as_module(model)
        names = list(models.layer_groups(net))
        self._check(names)
        due = self.trainable_groups(epoch)
        models.freeze_to(net, len(names) - len(due), train_bn=self.train_bn,
                         bn_stats=self.bn_stats)
        return [{"epoch": epoch, "kind": "unfreeze", "group": g, "lr": lr}
                for g, e, lr in self.plan if e == epoch]


# ------------------------------------------------------------ lr_find


@dataclass
class LRFinder:
    """Result of lr_find: the loss curve and a suggested learning rate.

    losses are smoothed (an exponential moving average); raw_losses are
    the per-batch values. suggestions holds every heuristic's pick.
    """

    lrs: list
    losses: list
    suggestion: float | None
    method: str = "valley"
    raw_losses: list = field(default_factory=list)
    suggestions: dict = field(default_factory=dict)

    def __repr__(self):
        picks = ", ".join(f"{k}={v:.2e}" for k, v in self.suggestions.items()
                          if v is not None)
        sug = "None" if self.suggestion is None else f"{self.suggestion:.2e}"
        return (f"LRFinder({len(self.lrs)} steps from {self.lrs[0]:.1e} to "
                f"{self.lrs[-1]:.1e}, suggestion={sug} by {self.method}; "
                f"{picks})")


def _valley(lrs, losses):
    """Middle of the longest stretch over which the loss keeps falling."""
    n = len(losses)
    # longest decreasing subsequence ending at each point, and its start
    length, begin = [1] * n, list(range(n))
    for i in range(n):
        for j in range(i):
            if losses[i] < losses[j] and length[j] + 1 > length[i]:
                length[i], begin[i] = length[j] + 1, begin[j]
    end = max(range(n), key=lambda i: (length[i], -i))
    return lrs[(begin[end] + end) // 2]


def _steepest(lrs, losses):
    """Learning rate where the loss falls fastest per decade."""
    slope = np.gradient(np.asarray(losses), np.log10(np.asarray(lrs)))
    return lrs[int(np.argmin(slope))]


def _minimum_tenth(lrs, losses):
    """A tenth of the learning rate with the lowest loss."""
    return lrs[int(np.argmin(losses))] / 10


SUGGESTERS = {"valley": _valley, "steepest": _steepest,
              "minimum/10": _minimum_tenth}


def lr_find(model: models.Model, loader: Iterable,
            optimizer: torch.optim.Optimizer | None = None,
            start_lr: float = 1e-7, end_lr: float = 10, num_iter: int = 100,
            loss_fn: nn.Module | None = None,
            device: str | torch.device | None = None, smooth: float = 0.98,
            diverge: float = 4.0, method: str = "valley",
            progress: bool | None = None) -> LRFinder:
    """Run the learning-rate range test and suggest a learning rate.

    The rate grows exponentially from start_lr to end_lr, one batch each,
    until the smoothed loss exceeds `diverge` times its minimum. Methods:
    "valley" (fastai's default: the middle of the longest stretch where
    the smoothed loss keeps falling), "steepest" (where it falls fastest
    per decade) and "minimum/10". Parameter groups keep their ratios (the
    group with the highest rate follows the sweep). Afterwards the model's
    weights, the optimizer's state and the random generators are restored
    exactly, so lr_find does not change what a later fit() does.
    """
    progress = config.show_progress(progress)
    net = models.as_module(model)
    if method not in SUGGESTERS:
        raise ValueError(f"unknown method {method!r}: use one of "
                         f"{', '.join(SUGGESTERS)}")
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got start_lr="
                         f"{start_lr}, end_lr={end_lr}")
    check_int(num_iter, "num_iter", low=5)
    if optimizer is None:
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("every parameter is frozen: unfreeze at least "
                             "the head before lr_find")
        optimizer = torch.optim.AdamW(params, lr=start_lr)
    device = config.get_device(device)
    net.to(device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    saved_model = _copy_state(net)
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_rng = _rng_state(loader)
    was_training = net.training
    top = max(g["lr"] for g in optimizer.param_groups)
    ratios = [g["lr"] / top if top > 0 else 1.0
              for g in optimizer.param_groups]
    lrs, raw, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    bar = tqdm(total=num_iter, desc="lr_find", unit="batch",
               disable=not progress)
    net.train()
    try:
        batches = iter(loader)
        for i in range(num_iter):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            _, loss = _step(net, x.to(device), y.to(device), optimizer,
                            loss_fn, None, None, device)
            value = loss.item()  # a sync per step: the test needs each loss
            bar.update()
            if not math.isfinite(value):
                diverged = True
                break
            avg = smooth * avg + (1 - smooth) * value
            current = avg / (1 - smooth ** (i + 1))
            lrs.append(lr)
            raw.append(value)
            smoothed.append(current)
            best = min(best, current)
            if i > 0 and current > diverge * best:
                diverged = True
                break
    finally:
        bar.close()
        net.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        net.train(was_training)
        _set_rng_state(saved_rng, loader)
    # The step that set off the divergence says nothing about a good rate.
    keep = len(smoothed) - 1 if diverged and smoothed else len(smoothed)
    picks = {name: (float(pick(lrs[:keep], smoothed[:keep]))
                    if keep >= 5 else None)
             for name, pick in SUGGESTERS.items()}
    if picks[method] is None:
        warnings.warn(f"the loss diverged after {len(raw)} steps, too few "
                      "to suggest a rate: lower start_lr", stacklevel=2)
    return LRFinder(lrs=lrs, losses=smoothed, suggestion=picks[method],
                    method=method, raw_losses=raw, suggestions=picks)
