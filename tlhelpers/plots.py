"""Plots for every concept of the course, each returning its Figure.

Training curves, confusion matrix, prediction grids, first-layer filters and
feature maps, embeddings, the unfreezing timeline, strategy comparisons and
the LR-finder curve. Every function works headless (no window is ever
opened; ``plt.show()`` is never called) and returns the matplotlib Figure,
so a notebook shows it and a test or script can save it.

Colours come from the Okabe-Ito palette, which stays distinguishable for
the common forms of colour blindness; mistakes are marked by a thick frame
and a label as well as by colour.
"""

import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from tlhelpers.display import as_history as _as_history
from tlhelpers.display import figure_to_png, show_figure
from tlhelpers.display import is_pil as _is_pil
from tlhelpers.display import pyplot as _pyplot

# Okabe & Ito (2008); the pale yellow goes last because it is hard to see
# on white.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
           "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MISTAKE_COLOR = "#D55E00"
EVENT_COLOR = "#555555"

__all__ = [
    "PALETTE", "CourseFigure", "plot_history", "plot_confusion_matrix",
    "confusion_counts", "show_predictions", "show_batch", "first_conv",
    "plot_filters", "feature_maps", "plot_feature_maps", "project_2d",
    "plot_embeddings", "plot_unfreezing_timeline",
    "plot_strategy_comparison", "plot_learning_curves", "plot_lr_finder",
    "figure_to_png",
]


# ---------------------------------------------------------------- backend


class CourseFigure(Figure):
    """A matplotlib Figure that a notebook shows once, not twice.

    A plot function draws its figure with pyplot (so the notebook shows it
    when the cell ends) and returns it (so it can be saved or changed).
    Left as a cell's last value, an ordinary Figure would then be shown a
    second time. This one draws itself and leaves pyplot, so the inline
    backend does not draw it again.
    """

    def _ipython_display_(self):
        show_figure(self)


def _subplots(nrows=1, ncols=1, figsize=None, **kwargs):
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False,
                             layout="constrained", FigureClass=CourseFigure,
                             **kwargs)
    return fig, axes


def _image_axis(ax):
    """Strip ticks and grid from an axis that shows an image."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


# ---------------------------------------------------------------- inputs


def _to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point or x.dtype.is_complex:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _is_history_collection(obj):
    """True for a dict of name -> history (several runs to compare)."""
    if not isinstance(obj, Mapping) or "epochs" in obj or not obj:
        return False
    return all(not isinstance(v, (str, bytes, int, float))
               for v in obj.values())


def _epoch_x(records):
    return np.array([_float(r.get("epoch", i + 1))
                     for i, r in enumerate(records)])


def _series(records, key):
    return np.array([_float(r.get(key)) for r in records])


def _has(values):
    return bool(np.isfinite(values).any())


def _base_group(name):
    return str(name).split("+", 1)[0]


def _group_rank(name):
    """Order group names stem first and head last, numbered ones between."""
    import re

    low = str(name).lower()
    if low in ("stem", "conv1", "features"):
        return (0, 0, low)
    if low == "head":
        return (3, 0, low)
    if low in ("neck", "fc", "pre_logits"):
        return (2, 0, low)
    nums = re.findall(r"\d+", low)
    return (1, int(nums[-1]) if nums else 0, low)


def _lr_table(records):
    """Return OrderedDict group -> lrs per epoch (nan where not training)."""
    groups = []
    for rec in records:
        for name in (rec.get("lrs") or {}):
            base = _base_group(name)
            if base not in groups:
                groups.append(base)
    groups.sort(key=_group_rank)
    table = OrderedDict((g, np.full(len(records), np.nan)) for g in groups)
    for i, rec in enumerate(records):
        for name, lr in (rec.get("lrs") or {}).items():
            base = _base_group(name)
            if math.isnan(table[base][i]):
                table[base][i] = _float(lr)
    return table


def _sequential_colors(n):
    """Colours for ordered things (early to late layers): viridis."""
    if n == 1:
        return [PALETTE[0]]
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    # Stop before viridis' bright yellow end, which vanishes on white.
    return [cmap(v) for v in np.linspace(0.0, 0.85, n)]


def _percent_axis(ax, values):
    from matplotlib.ticker import PercentFormatter

    finite = values[np.isfinite(values)] if len(values) else values
    scale = 100.0 if finite.size and finite.max() > 1.0 else 1.0
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=scale))
    return scale


def _event_groups(events):
    """Merge unfreeze events by epoch: epoch -> [(group, lr)]."""
    merged = OrderedDict()
    for ev in events:
        if not isinstance(ev, Mapping):
            continue
        if ev.get("kind", "unfreeze") != "unfreeze":
            continue
        epoch = _float(ev.get("epoch"))
        if math.isnan(epoch):
            continue
        merged.setdefault(epoch, []).append((ev.get("group"), ev.get("lr")))
    return merged


def _event_label(items):
    names = [str(g) for g, _ in items if g is not None]
    if not names:
        return "unfreeze"
    if len(names) > 3:
        names = names[:2] + [f"+{len(names) - 2} more"]
    return "unfreeze " + ", ".join(names)


# ---------------------------------------------------------------- history


def _mark_events(axes, events, color=EVENT_COLOR, label=True, first=None):
    """Draw a dotted line just before each epoch where groups unfroze.

    Events at the first epoch (the head starting to train) are not a
    change during training and are left out.
    """
    merged = _event_groups(events)
    if first is not None:
        merged = OrderedDict((e, v) for e, v in merged.items() if e > first)
    for epoch, items in merged.items():
        # The event happens at the start of `epoch`: draw the line between
        # the previous point and this one.
        x = epoch - 0.5
        for ax in axes:
            ax.axvline(x, color=color, linestyle=":", linewidth=1.3,
                       zorder=1)
        if label and axes:
            ax = axes[0]
            ax.text(x, 0.98, _event_label(items), rotation=90,
                    transform=ax.get_xaxis_transform(), va="top",
                    ha="center", fontsize=7.5, color=color, zorder=4,
                    bbox=dict(facecolor="white", edgecolor="none",
                              alpha=0.8, pad=1.5))
    return len(merged)


def _plot_single_history(records, events, metrics, title, figsize,
                         best_epoch):
    x = _epoch_x(records)
    panels = []
    loss = {k: _series(records, k) for k in ("train_loss", "val_loss")}
    acc = {k: _series(records, k) for k in ("train_acc", "val_acc")}
    lrs = _lr_table(records)
    if "loss" in metrics and any(_has(v) for v in loss.values()):
        panels.append("loss")
    if "accuracy" in metrics and any(_has(v) for v in acc.values()):
        panels.append("accuracy")
    if "lr" in metrics and any(_has(v) for v in lrs.values()):
        panels.append("lr")
    if not panels:
        raise ValueError("the history has no loss, accuracy or learning "
                         "rate to plot: is it empty? It has "
                         f"{len(records)} epoch record(s).")
    fig, axes = _subplots(1, len(panels),
                          figsize=figsize or (4.2 * len(panels), 3.4))
    axes = list(axes[0])
    styles = {"train": dict(linestyle="--", marker="o", color=PALETTE[0]),
              "val": dict(linestyle="-", marker="s", color=PALETTE[1])}
    for ax, panel in zip(axes, panels):
        ax.set_xlabel("epoch")
        if panel in ("loss", "accuracy"):
            series = loss if panel == "loss" else acc
            for key, values in series.items():
                if _has(values):
                    split = key.split("_")[0]
                    ax.plot(x, values, label=split, markersize=4,
                            **styles[split])
            ax.set_ylabel(panel)
            ax.set_title("Loss" if panel == "loss" else "Accuracy")
            if panel == "accuracy":
                _percent_axis(ax, np.concatenate(list(acc.values())))
                val = acc["val_acc"]
                if best_epoch is not None and _has(val):
                    hit = np.nonzero(x == _float(best_epoch))[0]
                    if hit.size:
                        ax.plot(x[hit[0]], val[hit[0]], marker="*",
                                markersize=13, color=PALETTE[3],
                                linestyle="none", label="best", zorder=5)
            ax.legend(fontsize=8, loc="best")
        else:
            colors = _sequential_colors(len(lrs))
            for (name, values), color in zip(lrs.items(), colors):
                if _has(values):
                    ax.plot(x, values, marker=".", color=color, label=name)
            ax.set_yscale("log")
            ax.set_ylabel("learning rate (log scale)")
            ax.set_title("Learning rate per group")
            # Head on top, as in the network and the unfreezing timeline.
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles[::-1], labels[::-1], fontsize=7,
                      loc="center left",
                      bbox_to_anchor=(1.0, 0.5), title="group",
                      title_fontsize=7, frameon=False)
        if len(x):
            ax.set_xlim(x.min() - 0.4, x.max() + 0.4)
        if len(x) <= 12:
            ax.set_xticks(x)
    _mark_events(axes, events, first=np.nanmin(x) if len(x) else None)
    fig.suptitle(title or "Training history")
    return fig


def _plot_history_comparison(runs, metrics, title, figsize):
    panels = [m for m in ("loss", "accuracy") if m in metrics]
    if not panels:
        raise ValueError("comparing histories supports metrics 'loss' and "
                         f"'accuracy', got {tuple(metrics)!r}")
    fig, axes = _subplots(1, len(panels),
                          figsize=figsize or (4.6 * len(panels), 3.6))
    axes = list(axes[0])
    all_acc = []
    for i, (name, history) in enumerate(runs.items()):
        records, events = _as_history(history)
        x = _epoch_x(records)
        color = PALETTE[i % len(PALETTE)]
        for ax, panel in zip(axes, panels):
            prefix = "loss" if panel == "loss" else "acc"
            for split, style in (("train", "--"), ("val", "-")):
                values = _series(records, f"{split}_{prefix}")
                if panel == "accuracy":
                    all_acc.append(values)
                if _has(values):
                    ax.plot(x, values, linestyle=style, color=color,
                            marker=MARKERS[i % len(MARKERS)],
                            markersize=3.5)
        _mark_events(axes, events, color=color, label=False,
                     first=np.nanmin(x) if len(x) else None)
    from matplotlib.lines import Line2D

    for ax, panel in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel)
        ax.set_title("Loss" if panel == "loss" else "Accuracy")
        if panel == "accuracy" and all_acc:
            _percent_axis(ax, np.concatenate(all_acc))
    run_handles = [Line2D([], [], color=PALETTE[i % len(PALETTE)],
                          marker=MARKERS[i % len(MARKERS)], label=str(n))
                   for i, n in enumerate(runs)]
    style_handles = [Line2D([], [], color="k", linestyle="--",
                            label="train"),
                     Line2D([], [], color="k", linestyle="-", label="val"),
                     Line2D([], [], color=EVENT_COLOR, linestyle=":",
                            label="unfreeze")]
    if len(axes) == 1:  # one panel holds both legends' entries
        axes[0].legend(handles=run_handles + style_handles, fontsize=8,
                       loc="best")
    else:
        axes[0].legend(handles=run_handles, fontsize=8, loc="best")
        axes[-1].legend(handles=style_handles, fontsize=8, loc="best")
    fig.suptitle(title or "Training histories compared")
    return fig


def plot_history(history, metrics=("loss", "accuracy", "lr"), title=None,
                 figsize=None):
    """Plot loss, accuracy and per-group learning rates over the epochs.

    Args:
        history: what fit() returns, a list of epoch dicts (keys epoch,
            train_loss, train_acc, val_loss, val_acc, lrs), or a dict
            name -> history to compare several runs (loss and accuracy,
            one colour per run, train dashed and validation solid).
        metrics: which panels to draw, among "loss", "accuracy", "lr";
            panels without data are left out.

    Unfreeze events are drawn as dotted lines just before the epoch in
    which the group started to train.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = set(metrics) - {"loss", "accuracy", "lr"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}: choose from "
                         "'loss', 'accuracy', 'lr'")
    if _is_history_collection(history):
        return _plot_history_comparison(history, metrics, title, figsize)
    records, events = _as_history(history)
    best = getattr(history, "best_epoch", None)
    return _plot_single_history(records, events, metrics, title, figsize,
                                best)


# ---------------------------------------------------------------- confusion


def _labels_pair(targets, preds):
    if preds is None and hasattr(targets, "preds"):
        targets, preds = targets.targets, targets.preds
    t = _to_numpy(targets).astype(int).ravel()
    p = _to_numpy(preds)
    if p.ndim == 2:  # scores or probabilities: take the arg-max
        p = p.argmax(axis=1)
    p = p.astype(int).ravel()
    if t.shape != p.shape:
        raise ValueError(f"targets and preds must have the same length, got "
                         f"{t.size} targets and {p.size} predictions")
    return t, p


def _class_names(class_names, n):
    if class_names is None:
        return [str(i) for i in range(n)]
    names = [str(c) for c in class_names]
    if len(names) < n:
        raise ValueError(f"got {len(names)} class names but labels go up to "
                         f"{n - 1}: pass one name per class")
    return names


def confusion_counts(targets, preds, num_classes):
    """Return the [true, predicted] count matrix as an int array."""
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(matrix, (targets, preds), 1)
    return matrix


def plot_confusion_matrix(targets, preds=None, class_names=None,
                          normalize=None, ax=None, title=None, cmap="Blues"):
    """Plot which classes are mistaken for which: rows true, columns
    predicted.

    Args:
        targets, preds: true and predicted labels (arrays, tensors or
            lists); preds may be [N, K] scores. A Predictions object (from
            predict()) can be passed alone as `targets`.
        normalize: None for counts, "true" to divide each row by its total
            (recall per class), "pred" for columns, "all" for the total.
    """
    t, p = _labels_pair(targets, preds)
    if t.size == 0:
        raise ValueError("no labels to count: targets and preds are empty")
    if (t < 0).any() or (p < 0).any():
        raise ValueError("labels must be class indices >= 0, got "
                         f"{min(t.min(), p.min())}")
    n = max(int(t.max()), int(p.max())) + 1
    if class_names is not None:
        n = max(n, len(class_names))
    names = _class_names(class_names, n)
    if normalize is True:
        normalize = "true"
    if normalize not in (None, False, "true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', "
                         f"got {normalize!r}")
    counts = confusion_counts(t, p, n)
    shown = counts.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "true":
            shown = shown / counts.sum(axis=1, keepdims=True)
        elif normalize == "pred":
            shown = shown / counts.sum(axis=0, keepdims=True)
        elif normalize == "all":
            shown = shown / counts.sum()
    shown = np.nan_to_num(shown)
    if ax is None:
        side = min(2.2 + 0.55 * n, 12)
        fig, axes = _subplots(figsize=(side + 1.2, side))
        ax = axes[0, 0]
    fig = ax.figure
    vmax = 1.0 if normalize else max(int(counts.max()), 1)
    image = ax.imshow(shown, cmap=cmap, vmin=0, vmax=vmax)
    ax.grid(False)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="fraction" if normalize else "count")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if counts[i, j] == 0:
                    continue  # blank cells let the mistakes stand out
                value = shown[i, j]
                text = f"{value:.0%}" if normalize else f"{counts[i, j]}"
                ax.text(j, i, text, ha="center", va="center",
                        fontsize=8 if n > 10 else 9,
                        color="white" if value > 0.55 * vmax else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    long_names = max(len(s) for s in names) > 4
    ax.set_xticklabels(names, rotation=45 if long_names else 0,
                       ha="right" if long_names else "center")
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = float((t == p).mean())
    ax.set_title(title or f"Confusion matrix (accuracy {accuracy:.1%})")
    return fig


# ---------------------------------------------------------------- images


def _image_array(image, mean=None, std=None):
    """Return an image as HxWx3 (or HxW) floats in [0, 1] for imshow."""
    if _is_pil(image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    raw = _to_numpy(image)
    arr = raw.astype(np.float32)
    # Tensors are channels-first; arrays usually channels-last.
    if arr.ndim == 3 and (hasattr(image, "detach") or (
            arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3))):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim not in (2, 3):
        raise ValueError(f"cannot show an array of shape {arr.shape} as an "
                         "image: expected CxHxW, HxWxC or HxW")
    if mean is not None and std is not None and arr.ndim == 3:
        m = np.asarray(mean, dtype=np.float32)[: arr.shape[-1]]
        s = np.asarray(std, dtype=np.float32)[: arr.shape[-1]]
        arr = arr * s + m
    elif raw.dtype == np.uint8:
        arr = arr / 255.0
    elif arr.size and (arr.min() < 0 or arr.max() > 1):
        # Normalised without its statistics: stretch so it stays visible.
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo + 1e-8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return np.clip(arr, 0.0, 1.0)


def _as_image_list(images):
    """Split a batch (tensor [N, C, H, W], array, list) into images."""
    if hasattr(images, "detach") or isinstance(images, np.ndarray):
        if images.ndim == 3 and hasattr(images, "detach") and \
                images.shape[0] in (1, 3):
            return [images]  # one CxHxW image, not a batch
        return list(images)
    return list(images)


def _grid(n, ncols):
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def _name(names, index):
    if names is None:
        return str(index)
    return names[index] if 0 <= index < len(names) else str(index)


def show_predictions(images, targets, preds=None, class_names=None,
                     probs=None, mean=None, std=None, ncols=6,
                     max_images=24, mistakes_first=False, title=None):
    """Show images with predicted and true labels; mistakes framed in red.

    Args:
        images: a batch tensor [N, C, H, W], a list of tensors, arrays or
            PIL images.
        targets, preds: true and predicted class indices; or pass the
            Predictions from predict() as `targets` alone.
        probs: optional [N, K] class probabilities; the predicted class's
            probability is shown next to its name.
        mean, std: the normalisation to undo (e.g. pretrained.meta["mean"]).
        mistakes_first: put the wrong predictions at the top of the grid.
    """
    if preds is None and hasattr(targets, "preds"):  # a Predictions
        targets, preds, probs = (targets.targets, targets.preds,
                                 targets.probs if probs is None else probs)
    if targets is None or preds is None:
        raise ValueError("show_predictions needs the true and the predicted "
                         "labels (or a Predictions object with targets)")
    images = _as_image_list(images)
    t = _to_numpy(targets).astype(int).ravel()
    p = _to_numpy(preds)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    p = p.astype(int).ravel()
    if not len(images) == len(t) == len(p):
        raise ValueError(f"need one target and one prediction per image, "
                         f"got {len(images)} images, {len(t)} targets and "
                         f"{len(p)} predictions")
    if not images:
        raise ValueError("no images to show")
    pr = _to_numpy(probs)
    order = np.arange(len(images))
    if mistakes_first:
        order = np.concatenate([order[t != p], order[t == p]])
    order = order[:max_images]
    nrows, ncols = _grid(len(order), ncols)
    fig, axes = _subplots(nrows, ncols,
                          figsize=(1.9 * ncols, 2.15 * nrows + 0.4))
    for ax in axes.ravel():
        _image_axis(ax)
    for ax, i in zip(axes.ravel(), order):
        arr = _image_array(images[i], mean, std)
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
        wrong = t[i] != p[i]
        label = _name(class_names, p[i])
        if pr is not None:
            label += f" ({pr[i, p[i]]:.0%})"
        # A right answer needs one name; a mistake shows both.
        text = (f"✗ {label}\ntrue: {_name(class_names, t[i])}" if wrong
                else f"{label}\n")
        ax.set_title(text, fontsize=8,
                     color=MISTAKE_COLOR if wrong else "black",
                     fontweight="bold" if wrong else "normal")
        for spine in ax.spines.values():
            spine.set_visible(wrong)
            spine.set_color(MISTAKE_COLOR)
            spine.set_linewidth(3.5)
    correct = int((t[order] == p[order]).sum())
    fig.suptitle(title or f"Predictions: {correct} of {len(order)} correct"
                 " (mistakes framed in red, with the true class)")
    return fig


def show_batch(batch, labels=None, class_names=None, mean=None, std=None,
               ncols=8, max_images=32, title=None):
    """Show a batch of images as the model sees them, normalisation undone.

    Args:
        batch: a tensor [N, C, H, W], or an (images, labels) pair as a
            DataLoader yields it.
        mean, std: the normalisation the transform applied (for a
            Pretrained: pretrained.meta["mean"], pretrained.meta["std"]).
            Without them each image is stretched to the full range.
    """
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and \
            hasattr(batch[0], "shape") and labels is None:
        batch, labels = batch
    images = _as_image_list(batch)[:max_images]
    if not images:
        raise ValueError("the batch is empty: nothing to show")
    lab = None if labels is None else _to_numpy(labels).astype(int).ravel()
    nrows, ncols = _grid(len(images), ncols)
    fig, axes = _subplots(nrows, ncols,
                          figsize=(1.6 * ncols, 1.75 * nrows + 0.4))
    for ax in axes.ravel():
        _image_axis(ax)
    for i, (ax, image) in enumerate(zip(axes.ravel(), images)):
        arr = _image_array(image, mean, std)
        ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
        if lab is not None:
            ax.set_title(_name(class_names, lab[i]), fontsize=8)
    shape = tuple(getattr(batch, "shape", ()))
    fig.suptitle(title or "A batch as the model sees it"
                 + (f" {list(shape)}" if shape else ""))
    return fig


# ---------------------------------------------------------------- filters


def _module(m):
    from tlhelpers.models import as_module  # torch loads on first use

    return as_module(m)


def first_conv(model):
    """Return (name, layer) of the first Conv2d that reads an RGB image."""
    import torch.nn as nn

    for name, sub in _module(model).named_modules():
        if isinstance(sub, nn.Conv2d) and sub.in_channels == 3:
            return name, sub
    raise ValueError(
        f"{type(_module(model)).__name__} has no Conv2d layer with 3 input "
        "channels, so there are no colour filters to show. plot_filters "
        "needs a convolutional network that reads RGB images.")


def plot_filters(model, max_filters=64, ncols=None, title=None):
    """Show the first convolution layer's filters as small colour images.

    Each filter is scaled to [0, 1] on its own, so its pattern (edge,
    colour blob, stripe) is visible whatever its magnitude.
    """
    name, conv = first_conv(model)
    weight = _to_numpy(conv.weight)[:max_filters]  # [out, 3, k, k]
    n = weight.shape[0]
    # A wide grid (8 across for 32 filters) wastes less space than a square.
    ncols = ncols or min(16, int(math.ceil(1.4 * math.sqrt(n))))
    nrows, ncols = _grid(n, ncols)
    fig, axes = _subplots(nrows, ncols,
                          figsize=(0.9 * ncols + 0.6, 0.9 * nrows + 0.8))
    for ax in axes.ravel():
        _image_axis(ax)
    for ax, w in zip(axes.ravel(), weight):
        w = w.transpose(1, 2, 0)
        w = (w - w.min()) / (w.max() - w.min() + 1e-8)
        ax.imshow(w, interpolation="nearest")
    k = tuple(conv.kernel_size)
    total = conv.out_channels
    label = f"layer {name}" if name.isdigit() else name
    fig.suptitle(title or f"First-layer filters: {label} ({n} of {total}, "
                 f"{k[0]}x{k[1]} pixels each)", fontsize=10)
    return fig


# ---------------------------------------------------------------- features


def _prepare_image(model, image):
    """Return a [1, C, H, W] float tensor for the model."""
    import torch

    if _is_pil(image):  # PIL
        transform = getattr(model, "transform", None)
        if transform is None:
            from torchvision.transforms.functional import to_tensor

            transform = to_tensor
        image = transform(image)
    if not torch.is_tensor(image):
        image = torch.as_tensor(np.asarray(image))
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError("pass one image, as a tensor [C, H, W] or "
                         f"[1, C, H, W], got shape {tuple(image.shape)}")
    return image.float()


def _stage_modules(model, groups=None):
    if groups is not None:
        return OrderedDict(
            (k, list(v) if isinstance(v, (list, tuple)) else [v])
            for k, v in groups.items())
    from tlhelpers.models import layer_groups

    with warnings.catch_warnings():
        # The fallback grouping's warning is about freezing, not plots.
        warnings.simplefilter("ignore")
        return layer_groups(model)


def feature_maps(model, image, groups=None):
    """Run one image through the model and keep each stage's feature maps.

    Args:
        model: an nn.Module or the object returned by load_pretrained.
        image: a preprocessed tensor [C, H, W] or [1, C, H, W], or a PIL
            image (then the Pretrained's own transform is applied).
        groups: optional dict name -> module(s); default layer_groups(m).

    Returns:
        OrderedDict stage name -> tensor [C, H, W] for every stage whose
        output is an image-like map (the classifier head is left out).
    """
    import torch

    net = _module(model)
    stages = _stage_modules(net, groups)
    batch = _prepare_image(model, image)
    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    captured = OrderedDict()

    def hook_for(name):
        def hook(module, args, output):
            if torch.is_tensor(output) and output.ndim == 4 and \
                    output.shape[-1] * output.shape[-2] > 1:
                # Modules finish in order (a container after its layers),
                # so the stage keeps its last spatial output.
                captured[name] = output[0].detach().float().cpu()
        return hook

    # Every layer inside a stage is watched, so a stage that ends with
    # pooling and flattening still shows its last real feature map.
    handles = [sub.register_forward_hook(hook_for(name))
               for name, mods in stages.items() for mod in mods
               for sub in mod.modules()]
    from tlhelpers.models import eval_mode

    try:
        with eval_mode(net), torch.no_grad():
            net(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError(f"no stage of {type(net).__name__} produced a "
                         "feature map [N, C, H, W]: is it a convolutional "
                         "network?")
    return OrderedDict((k, captured[k]) for k in stages if k in captured)


def _norm(a):
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _top_channels(fmap, k):
    """Indices of the k channels with the strongest mean activation."""
    strength = fmap.reshape(fmap.shape[0], -1).mean(axis=1)
    return np.argsort(-strength, kind="stable")[:k]


def plot_feature_maps(model, image=None, channels=6, stages=None, mean=None,
                      std=None, title=None):
    """Show what one image looks like at each stage of the network.

    Early stages keep edges and colours at high resolution; late stages
    are small, abstract maps. Each row is a stage, showing its `channels`
    most active channels, each scaled to [0, 1] on its own.

    Args:
        model: an nn.Module, a Pretrained, or the dict feature_maps()
            returned (then `image` is only drawn, not run).
        image: the preprocessed image (tensor) or a PIL image.
        stages: names of the stages to show (default: all).
        mean, std: the normalisation to undo when drawing the input
            (default: a Pretrained's own).
    """
    if isinstance(model, Mapping):
        maps = OrderedDict(model)
    else:
        if image is None:
            raise ValueError("plot_feature_maps needs the image to run "
                             "through the model")
        maps = feature_maps(model, image)
    if stages is not None:
        stages = [stages] if isinstance(stages, str) else list(stages)
        missing = [s for s in stages if s not in maps]
        if missing:
            raise ValueError(f"unknown stage(s) {missing}: choose from "
                             f"{list(maps)}")
        maps = OrderedDict((s, maps[s]) for s in stages)
    meta = getattr(model, "meta", None) or {}
    mean = meta.get("mean") if mean is None else mean
    std = meta.get("std") if std is None else std
    show_input = image is not None
    shown = None
    if show_input:
        if _is_pil(image) and not isinstance(model, Mapping):
            shown = _image_array(_prepare_image(model, image)[0], mean, std)
        elif _is_pil(image):
            shown = _image_array(image)
        else:
            img = _prepare_image(None, image)[0]
            shown = _image_array(img, mean, std)
    ncols = channels + (1 if show_input else 0)
    nrows = len(maps)
    fig, axes = _subplots(nrows, ncols,
                          figsize=(1.35 * ncols + 0.9, 1.4 * nrows + 0.5))
    for ax in axes.ravel():
        _image_axis(ax)
    for row, (name, fmap) in enumerate(maps.items()):
        arr = _to_numpy(fmap)
        col0 = 0
        if show_input:
            if row == 0:
                axes[0, 0].imshow(shown, cmap="gray" if shown.ndim == 2
                                  else None)
                axes[0, 0].set_title("input", fontsize=8)
            else:
                axes[row, 0].set_visible(False)
            col0 = 1
        c, h, w = arr.shape
        for j, ch in enumerate(_top_channels(arr, channels)):
            ax = axes[row, col0 + j]
            ax.imshow(_norm(arr[ch]), cmap="viridis",
                      interpolation="nearest")
            ax.set_title(f"ch {ch}", fontsize=7)
        label_ax = axes[row, col0]
        label_ax.set_ylabel(f"{name}\n{c}x{h}x{w}", fontsize=8,
                            rotation=0, ha="right", va="center")
    fig.suptitle(title or "Feature maps of one image, stage by stage "
                 "(most active channels)", fontsize=10)
    return fig


# ---------------------------------------------------------------- embeddings


def _features_labels(value, labels=None):
    if hasattr(value, "features") and not hasattr(value, "shape"):
        own = getattr(value, "labels", None)
        return _to_numpy(value.features), _to_numpy(
            labels if own is None else own)
    if isinstance(value, (tuple, list)) and len(value) == 2 and \
            hasattr(value[0], "shape"):
        return _to_numpy(value[0]), _to_numpy(value[1])
    return _to_numpy(value), _to_numpy(labels)


def project_2d(features, method="pca", seed=0):
    """Project [N, D] features to 2-D with PCA or t-SNE.

    Returns:
        (points [N, 2], axis labels (str, str)).
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    n, d = x.shape
    if n < 3:
        raise ValueError(f"need at least 3 feature vectors to draw a map, "
                         f"got {n}")
    from sklearn.decomposition import PCA

    if method == "pca":
        pca = PCA(n_components=min(2, d), random_state=seed)
        points = pca.fit_transform(x)
        if points.shape[1] == 1:
            points = np.column_stack([points, np.zeros(n)])
        ratio = list(pca.explained_variance_ratio_) + [0.0]
        return points, (f"PC 1 ({ratio[0]:.0%} of variance)",
                        f"PC 2 ({ratio[1]:.0%} of variance)")
    if method == "tsne":
        from sklearn.manifold import TSNE

        # PCA first: faster, and the usual advice for t-SNE on deep features.
        if d > 50 and n > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
        points = TSNE(n_components=2, perplexity=perplexity, init="pca",
                      random_state=seed).fit_transform(x)
        return points, ("t-SNE 1", "t-SNE 2")
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


_METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE"}


def _scatter_classes(ax, points, labels, class_names):
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=14, color=PALETTE[0],
                   alpha=0.8)
        return
    labels = np.asarray(labels).astype(int).ravel()
    for k in np.unique(labels):
        mask = labels == k
        # A dark rim keeps the pale palette colours visible on white.
        ax.scatter(points[mask, 0], points[mask, 1], s=24, alpha=0.9,
                   color=PALETTE[k % len(PALETTE)],
                   marker=MARKERS[(k // len(PALETTE) + k) % len(MARKERS)],
                   edgecolors="#333333", linewidths=0.4,
                   label=_name(class_names, int(k)))


def plot_embeddings(features, labels=None, class_names=None, method="pca",
                    ax=None, title=None, seed=0):
    """Draw feature vectors as a 2-D map (PCA or t-SNE), coloured by class.

    Classes that form separate clusters are easy for a linear classifier.
    Pass a dict title -> features (a Features object or a (features,
    labels) pair) to draw several maps side by side, e.g. pretrained
    against random features.

    Args:
        features: [N, D] array or tensor, a Features object (from
            extract_features), or a dict of those.
        labels: [N] class indices (taken from a Features object if None).
        method: "pca" (fast, linear) or "tsne" (slower, keeps neighbours).
    """
    if class_names is None:
        first = next(iter(features.values()), None) if isinstance(
            features, Mapping) else features
        class_names = getattr(first, "classes", None)
    if isinstance(features, Mapping):
        if ax is not None:
            raise ValueError("several maps need their own figure: leave "
                             "ax=None when passing a dict")
        items = list(features.items())
        if not items:
            raise ValueError("the dict of features is empty")
        fig, axes = _subplots(1, len(items),
                              figsize=(4.3 * len(items) + 1.4, 4.0))
        for a, (name, value) in zip(axes[0], items):
            x, y = _features_labels(value, labels)
            points, axis_labels = project_2d(x, method, seed)
            _scatter_classes(a, points, y, class_names)
            a.set_xlabel(axis_labels[0])
            a.set_ylabel(axis_labels[1])
            a.set_title(f"{name} ({x.shape[1]}-d)")
        handles, names = axes[0, 0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, names, loc="outside right center",
                       fontsize=8, title="class", frameon=False)
        fig.suptitle(title or f"Feature space ({_METHOD_NAMES[method]})")
        return fig
    x, y = _features_labels(features, labels)
    if y is not None and len(y) != len(x):
        raise ValueError(f"need one label per feature vector, got {len(x)} "
                         f"vectors and {len(y)} labels")
    points, axis_labels = project_2d(x, method, seed)
    if ax is None:
        fig, axes = _subplots(figsize=(5.6, 4.2))
        ax = axes[0, 0]
    fig = ax.figure
    _scatter_classes(ax, points, y, class_names)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title or f"Feature space ({_METHOD_NAMES[method]}, "
                 f"{x.shape[1]}-d features)")
    if y is not None:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  title="class", frameon=False)
    return fig


# ---------------------------------------------------------------- timeline


def _is_plan(rows):
    """True for GradualUnfreezing.timeline(): [(group, start, lr)]."""
    return bool(rows) and all(
        isinstance(r, (tuple, list)) and len(r) == 3 and isinstance(r[0], str)
        for r in rows)


def _timeline_changes(source):
    """Return {epoch: {group: lr, or None if frozen}} from any timeline.

    The state at an epoch holds until the next epoch listed. Takes a
    GradualUnfreezing (its timeline(): [(group, start_epoch, lr)]), a
    training History (the learning rates it recorded, rows {epoch, lrs})
    or a dict epoch -> {group: lr} or epoch -> [groups].
    """
    if hasattr(source, "timeline") and callable(source.timeline):
        return _timeline_changes(source.timeline())
    if hasattr(source, "epochs") and not isinstance(
            source, (list, tuple, Mapping)):
        return _timeline_changes(_as_history(source)[0])
    if isinstance(source, Mapping):
        rows = []
        for epoch, value in source.items():
            if isinstance(value, Mapping):
                rows.append({"epoch": epoch, "lrs": dict(value)})
            else:
                names = [value] if isinstance(value, str) else list(value)
                rows.append({"epoch": epoch,
                             "lrs": {g: math.nan for g in names}})
        source = rows
    source = list(source)
    if not source:
        raise ValueError("the unfreezing timeline is empty")
    changes = {}
    if _is_plan(source):
        for _, start, _ in source:
            changes[int(start)] = {str(g): _float(lr)
                                   for g, s, lr in source if s <= start}
        return changes
    for r in source:
        if not isinstance(r, Mapping) or "epoch" not in r or not isinstance(
                r.get("lrs"), Mapping):
            raise ValueError(
                "a timeline is a GradualUnfreezing, a History from fit(), "
                "or {epoch: {group: lr}} or {epoch: [groups]}; got a row "
                f"{r!r}")
        state = changes.setdefault(int(r["epoch"]), {})
        for g, lr in r["lrs"].items():
            if lr not in (None, 0, False):
                state.setdefault(_base_group(g), _float(lr))
    return changes


def _timeline_matrix(source, epochs=None, groups=None):
    """Return (epochs, {group: lr per epoch}, {group: trains per epoch})."""
    changes = _timeline_changes(source)
    known = sorted(changes)
    first = 0 if known[0] == 0 else 1
    last = known[-1] if epochs is None else max(known[-1],
                                                first + int(epochs) - 1)
    epoch_list = list(range(first, last + 1))
    names = []
    for state in changes.values():
        names += [g for g in state if g not in names]
    if groups is not None:
        order = [str(g) for g in groups]
        names = order + [g for g in names if g not in order]
    else:
        names.sort(key=_group_rank)
    matrix = OrderedDict((g, np.full(len(epoch_list), np.nan))
                         for g in names)
    trains = OrderedDict((g, np.zeros(len(epoch_list), bool))
                         for g in names)
    state = {}
    for i, e in enumerate(epoch_list):
        state = changes.get(e, state)
        for g, lr in state.items():
            if lr is not None:
                trains[g][i] = True
                matrix[g][i] = lr
    return epoch_list, matrix, trains


def _short_lr(lr):
    """1e-3, 2.5e-4: a learning rate in as few characters as it needs."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _group_names(groups):
    if groups is None or isinstance(groups, (list, tuple)):
        return groups
    from tlhelpers.models import layer_groups

    return list(layer_groups(_module(groups)))


def plot_unfreezing_timeline(schedule, epochs=None, groups=None,
                             title=None):
    """Draw which layer group trains in which epoch, and at what rate.

    One row per group (stem at the bottom, head at the top): a coloured
    cell where the group trains, coloured and labelled by its learning
    rate; grey where it is frozen.

    Args:
        schedule: a GradualUnfreezing, a History from fit(), or timeline
            rows such as {epoch: {group: lr}} or {epoch: [groups]}.
        epochs: the total number of epochs (the last state carries on).
        groups: every group name, stem first, or the model: shows the
            groups that never train too.
    """
    from matplotlib.colors import LogNorm, to_rgb

    epoch_list, matrix, trains = _timeline_matrix(schedule, epochs,
                                                  _group_names(groups))
    groups = list(matrix)
    lrs = np.concatenate([v[np.isfinite(v)] for v in matrix.values()]
                         + [np.array([])])
    lrs = lrs[lrs > 0]
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    norm = None
    if lrs.size:
        lo, hi = lrs.min(), lrs.max()
        if hi <= lo:
            lo, hi = lo / 2, hi * 2
        norm = LogNorm(vmin=lo, vmax=hi)
    width = max(6.5, 0.6 * len(epoch_list) + 2.8)
    fig, axes = _subplots(figsize=(width, 0.34 * len(groups) + 1.5))
    ax = axes[0, 0]
    ax.grid(False)
    for row, g in enumerate(groups):
        for i, e in enumerate(epoch_list):
            if trains[g][i]:
                lr = matrix[g][i]
                known = norm is not None and np.isfinite(lr)
                rgb = np.asarray(to_rgb(cmap(norm(lr)) if known
                                        else PALETTE[0]))
                ax.barh(row, 1.0, left=e - 0.5, height=0.72, color=rgb,
                        edgecolor="white", linewidth=1)
                if known and len(epoch_list) <= 16:
                    dark = rgb @ np.array([0.299, 0.587, 0.114]) < 0.5
                    ax.text(e, row, _short_lr(lr), ha="center",
                            va="center", fontsize=7.5,
                            color="white" if dark else "black")
            else:
                ax.barh(row, 1.0, left=e - 0.5, height=0.72,
                        color="#E6E6E6", edgecolor="white", linewidth=1)
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels(groups, fontsize=8)
    ax.set_xticks(epoch_list)
    ax.set_xlim(epoch_list[0] - 0.5, epoch_list[-1] + 0.5)
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer group (input at the bottom)")
    if norm is not None:
        from matplotlib.cm import ScalarMappable

        mappable = ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(mappable, ax=ax, label="learning rate", pad=0.02,
                     aspect=15)
    ax.set_title(title or "Gradual unfreezing: which group trains when "
                 "(grey = frozen)")
    return fig


# ---------------------------------------------------------------- strategies




def _rows(table):
    if hasattr(table, "rows") and not isinstance(table, (list, tuple)):
        table = table.rows
    rows = [dict(r) for r in table]
    if not rows:
        raise ValueError("the comparison table is empty: run "
                         "compare_strategies first")
    return rows


def _require(rows, column):
    """Return the column's name; raise if no row has it."""
    if not any(column in r for r in rows):
        raise ValueError(f"the table has no {column!r} column; columns: "
                         f"{sorted(rows[0])}")
    return column


def _percent(value):
    """0.125 -> '12.5%', 0.2 -> '20%'."""
    return f"{value:.1%}".replace(".0%", "%")


def _strategy_names(rows, key):
    names = []
    for r in rows:
        if r[key] not in names:
            names.append(r[key])
    return names


def _pretty(name):
    """'full_fine_tuning' -> 'full fine tuning', as the notebooks say it."""
    return str(name).replace("_", " ")


def _mean_spread(rows, key):
    """Return (mean, below, above): the spread across seeds, as offsets.

    Rows from compare_strategies(seeds=...) carry key_min and key_max;
    repeated rows (one per seed) give their own minimum and maximum.
    """
    mean, _ = _mean_std(r.get(key) for r in rows)
    lows = [_float(r[f"{key}_min"]) for r in rows if f"{key}_min" in r]
    highs = [_float(r[f"{key}_max"]) for r in rows if f"{key}_max" in r]
    if not lows:
        vals = [_float(r.get(key)) for r in rows]
        lows = highs = [v for v in vals if np.isfinite(v)]
    if not lows or not np.isfinite(mean):
        return mean, 0.0, 0.0
    return mean, max(mean - min(lows), 0.0), max(max(highs) - mean, 0.0)


def _mean_std(values):
    vals = np.array([_float(v) for v in values])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return math.nan, 0.0
    return float(vals.mean()), float(vals.std()) if vals.size > 1 else 0.0


def _format_count(value):
    if not np.isfinite(value):
        return "-"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def plot_strategy_comparison(table, metric="accuracy",
                             extra=("trainable_params", "seconds"),
                             chance=None, title=None):
    """Compare strategies: one bar each, annotated with its accuracy.

    Also draws the trainable parameters and wall time when the table has
    them (the cost side of each strategy). Repeated rows of one strategy
    (seeds) are averaged, with the spread (min to max, or the table's
    accuracy_min and accuracy_max) as an error bar; when the table
    spans several labels-per-class values, the largest one is shown (see
    plot_learning_curves for all of them).

    Args:
        table: what compare_strategies returns, or a list of dict rows with
            a "strategy" column and the metric.
        chance: optional chance-level accuracy drawn as a dashed line.
    """
    rows = _rows(table)
    skey, size_key = _require(rows, "strategy"), "labels_per_class"
    _require(rows, metric)
    note = ""
    if any(size_key in r for r in rows):
        sizes = {r.get(size_key) for r in rows if r.get(size_key) is not None}
        if len(sizes) > 1:
            biggest = max(sizes)
            rows = [r for r in rows if r.get(size_key) == biggest]
            note = f" ({biggest} labels per class)"
    names = _strategy_names(rows, skey)
    panels = [metric] + [k for k in (extra or ()) if any(
        r.get(k) is not None for r in rows)]
    fig, axes = _subplots(1, len(panels), figsize=(
        4.4 + 3.0 * (len(panels) - 1), 0.5 * len(names) + 1.6),
        sharey=True)
    axes = list(axes[0])
    y = np.arange(len(names))[::-1]
    for p_i, (ax, key) in enumerate(zip(axes, panels)):
        # the spread across seeds (min to max) as error bars
        stats = [_mean_spread([r for r in rows if r[skey] == n], key)
                 for n in names]
        means = np.array([m for m, _, _ in stats])
        errs = np.array([[lo for _, lo, _ in stats],
                         [hi for _, _, hi in stats]])
        color = PALETTE[0] if p_i == 0 else PALETTE[5 if p_i == 1 else 1]
        # Parameter counts span orders of magnitude (a head has thousands,
        # the whole network millions): only a log axis shows both.
        log = key == "trainable_params" and np.nanmin(
            np.append(means, np.inf)) > 0
        bars = ax.barh(y, np.nan_to_num(means), color=color,
                       xerr=errs if errs.any() else None,
                       error_kw=dict(ecolor="#333333", capsize=3),
                       log=log)
        ax.grid(True, axis="x", alpha=0.3)
        ax.grid(False, axis="y")
        is_acc = key == metric and np.nanmax(np.append(means, 0)) <= 1.0 \
            and "acc" in key
        for bar, m in zip(bars, means):
            if is_acc:
                text = f"{m:.1%}" if np.isfinite(m) else "-"
            elif key == "seconds":
                text = f"{m:.1f} s" if np.isfinite(m) else "-"
            else:
                text = _format_count(m)
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    " " + text, va="center", fontsize=8)
        if is_acc:
            from matplotlib.ticker import PercentFormatter

            ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
            ax.set_xlim(0, 1.15)
            if chance is not None:
                ax.axvline(chance, color=MISTAKE_COLOR, linestyle="--",
                           linewidth=1.2, label=f"chance ({_percent(chance)})")
                ax.legend(fontsize=8, loc="lower right")
        elif log:
            ax.set_xlim(1, np.nanmax(means) * 30)
        else:
            top = np.nanmax(np.append(means + errs[1], 0))
            ax.set_xlim(0, top * 1.3 if top > 0 else 1)
        ax.set_xlabel({"trainable_params": "trainable parameters (log)",
                       "seconds": "wall time (s)",
                       "peak_mem_mb": "peak memory (MB)"}.get(key, key))
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([_pretty(n) for n in names])
    fig.suptitle(title or f"Strategies compared{note}")
    return fig


def plot_learning_curves(table, x=None, metric="accuracy", chance=None,
                         title=None):
    """Plot accuracy against labels per class, one line per strategy.

    Where the lines cross is where the best strategy changes: with few
    labels, frozen pretrained features usually win.

    Args:
        table: compare_strategies rows over several labels-per-class
            values (columns "strategy", "labels_per_class", "accuracy").
        x: the column on the x axis (default "labels_per_class").
    """
    rows = _rows(table)
    skey = _require(rows, "strategy")
    xkey = _require(rows, x or "labels_per_class")
    _require(rows, metric)
    names = _strategy_names(rows, skey)
    fig, axes = _subplots(figsize=(6.4, 4.2))
    ax = axes[0, 0]
    all_x, all_y = [], []
    for i, name in enumerate(names):
        mine = [r for r in rows if r[skey] == name and r.get(xkey) is not None]
        xs = sorted({_float(r[xkey]) for r in mine})
        stats = [_mean_spread([r for r in mine if _float(r[xkey]) == v],
                              metric) for v in xs]
        ys = np.array([m for m, _, _ in stats])
        below = np.array([lo for _, lo, _ in stats])
        above = np.array([hi for _, _, hi in stats])
        color = PALETTE[i % len(PALETTE)]
        ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], color=color,
                label=_pretty(name))
        if below.any() or above.any():  # the spread across seeds
            ax.fill_between(xs, ys - below, ys + above, color=color,
                            alpha=0.15, linewidth=0)
        all_x += xs
        all_y.append(ys)
    ticks = sorted(set(all_x))
    if ticks and min(ticks) > 0 and max(ticks) / min(ticks) >= 8:
        ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, PercentFormatter

    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    values = np.concatenate(all_y) if all_y else np.array([])
    if values.size and np.nanmax(values) <= 1.0 and "acc" in metric:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if chance is not None:
        ax.axhline(chance, color=EVENT_COLOR, linestyle="--", linewidth=1.1,
                   label="chance")
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
              frameon=False, title="strategy")
    ax.set_title(title or "Learning curves: accuracy against labels")
    return fig


# ---------------------------------------------------------------- LR finder


def _lr_finder_data(result):
    if isinstance(result, Mapping):
        lrs, losses = result.get("lrs"), result.get("losses")
        suggestion = result.get("suggestion")
    else:
        lrs = getattr(result, "lrs", None)
        losses = getattr(result, "losses", None)
        suggestion = getattr(result, "suggestion", None)
    if lrs is None or losses is None:
        raise TypeError("expected what lr_find() returns (with .lrs, "
                        ".losses and .suggestion), got "
                        f"{type(result).__name__}")
    lrs = np.array([_float(v) for v in lrs])
    losses = np.array([_float(v) for v in losses])
    if lrs.shape != losses.shape or lrs.size < 2:
        raise ValueError(f"need one loss per learning rate (at least two), "
                         f"got {lrs.size} rates and {losses.size} losses")
    return lrs, losses, suggestion


def plot_lr_finder(result, title=None):
    """Plot loss against learning rate (log scale) with the suggestion.

    The suggestion sits on the steep downward part of the curve, well
    before the loss blows up.
    """
    lrs, losses, suggestion = _lr_finder_data(result)
    fig, axes = _subplots(figsize=(6.0, 4.0))
    ax = axes[0, 0]
    ok = np.isfinite(losses) & (lrs > 0)
    ax.plot(lrs[ok], losses[ok], color=PALETTE[0], linewidth=1.8,
            label="loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    if ok.any():
        good = losses[ok]
        start, low = good[0], good.min()
        top = good.max()
        if start > low:
            # Keep the final blow-up from squashing the useful part.
            top = min(top, start + 1.5 * (start - low))
        pad = 0.05 * max(top - low, 1e-8)
        ax.set_ylim(low - pad, top + pad)
    if suggestion is not None and np.isfinite(_float(suggestion)):
        s = _float(suggestion)
        ax.axvline(s, color=PALETTE[3], linestyle="--", linewidth=1.3)
        at = np.interp(np.log(s), np.log(lrs[ok]), losses[ok]) \
            if ok.sum() >= 2 else math.nan
        ax.plot([s], [at], marker="o", color=PALETTE[3], markersize=8,
                linestyle="none", label=f"suggestion: {s:.1e}")
        ax.legend(fontsize=9, loc="best")
    ax.set_title(title or "Learning-rate finder")
    return fig
