"""Tests for tlhelpers.plots: every plot returns a labelled, savable Figure."""

import os
import subprocess
import sys
from collections import OrderedDict
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from tlhelpers import plots

NAMES = ["circle", "square", "triangle"]


@pytest.fixture(autouse=True)
def _close_figures():
    """Close every figure a test made, so none leaks into the next."""
    yield
    plots._pyplot().close("all")


class ToyNet(nn.Module):
    """A three-stage conv net small enough to run in milliseconds."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, classes))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def toy_net():
    torch.manual_seed(0)
    return ToyNet()


def records(n=6, unfreeze_at=4):
    """Epoch dicts like fit() records, a group joining at `unfreeze_at`."""
    rows = []
    for e in range(1, n + 1):
        lrs = {"head": 1e-3, "head+no_decay": 1e-3}
        if e >= unfreeze_at:
            lrs.update({"stage7": 2e-4, "stage7+no_decay": 2e-4})
        rows.append({"epoch": e, "train_loss": 1.0 / e,
                     "val_loss": 1.2 / e, "train_acc": 1 - 0.5 / e,
                     "val_acc": 1 - 0.6 / e, "lrs": lrs, "time": 0.1})
    return rows


EVENTS = [{"epoch": 4, "kind": "unfreeze", "group": "stage7", "lr": 2e-4}]


def history_obj(n=6):
    return SimpleNamespace(epochs=records(n), events=EVENTS, best_epoch=n)


def _at_x(ax, x):
    """The lines of `ax` drawn at a single x (vertical markers)."""
    return [ln for ln in ax.lines
            if np.size(ln.get_xdata()) in (1, 2)
            and np.allclose(ln.get_xdata(), x)]


def texts(fig):
    found = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        found += [t.get_text() for t in ax.texts]
        found.append(ax.get_title())
    if fig._suptitle is not None:
        found.append(fig._suptitle.get_text())
    return found


def legend_labels(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def strategy_table():
    rows = []
    acc = {"from scratch": 0.3, "linear probe": 0.9, "full fine-tuning": 0.8}
    params = {"from scratch": 4_000_000, "linear probe": 3_843,
              "full fine-tuning": 4_000_000}
    for k in (1, 5, 10):
        for name, a in acc.items():
            rows.append({"strategy": name, "labels_per_class": k,
                         "accuracy": a * (0.5 + k / 20),
                         "trainable_params": params[name],
                         "seconds": 0.1 * k, "peak_mem_mb": 100.0})
    return rows


def lr_result():
    lrs = np.logspace(-6, 0, 40)
    losses = 2.0 - 0.8 * np.tanh(np.log10(lrs) + 4) + np.where(
        lrs > 0.1, 5 * lrs, 0)
    return SimpleNamespace(lrs=list(lrs), losses=list(losses),
                           suggestion=1e-4)


# ---------------------------------------------------------------- history


def test_plot_history_draws_loss_accuracy_and_lr_per_group():
    fig = plots.plot_history(history_obj())
    assert isinstance(fig, Figure)
    loss, acc, lr = fig.axes[:3]
    assert [loss.get_title(), acc.get_title(), lr.get_title()] == [
        "Loss", "Accuracy", "Learning rate per group"]
    assert loss.get_xlabel() == acc.get_xlabel() == "epoch"
    assert lr.get_yscale() == "log"
    assert {"train", "val"} <= set(legend_labels(loss))
    # "+no_decay" twins are one group; the head is listed on top.
    assert legend_labels(lr) == ["head", "stage7"]


def test_plot_history_marks_unfreeze_events_with_line_and_label():
    fig = plots.plot_history(records(), metrics=("loss",))
    (ax,) = fig.axes
    before = len(ax.lines)
    fig2 = plots.plot_history({"epochs": records(), "events": EVENTS},
                              metrics=("loss",))
    ax2 = fig2.axes[0]
    vertical = _at_x(ax2, 3.5)
    assert len(ax2.lines) == before + 1 and len(vertical) == 1
    assert any("unfreeze stage7" in t for t in texts(fig2))


def test_plot_history_skips_the_head_starting_at_the_first_epoch():
    events = [{"epoch": 1, "kind": "unfreeze", "group": "head", "lr": 1e-3}]
    fig = plots.plot_history({"epochs": records(), "events": events},
                             metrics=("loss",))
    assert not _at_x(fig.axes[0], 0.5)
    assert not any("unfreeze" in t for t in texts(fig))


def test_plot_history_stars_the_best_epoch_of_a_history_object():
    fig = plots.plot_history(history_obj())
    assert "best" in legend_labels(fig.axes[1])


def test_plot_history_leaves_out_panels_without_data():
    rows = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    fig = plots.plot_history(rows)
    assert [ax.get_title() for ax in fig.axes] == ["Loss"]


def test_plot_history_compares_runs_given_as_a_dict():
    fig = plots.plot_history({"head only": records(),
                              "full": history_obj()})
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Accuracy"]
    assert legend_labels(fig.axes[0]) == ["head only", "full"]
    assert legend_labels(fig.axes[1])[:2] == ["train", "val"]


def test_plot_history_keeps_the_run_names_on_a_single_panel():
    fig = plots.plot_history({"head only": records(),
                              "full": history_obj()}, metrics="accuracy")
    (ax,) = fig.axes
    assert legend_labels(ax)[:4] == ["head only", "full", "train", "val"]


def test_plot_history_explains_an_empty_history():
    with pytest.raises(ValueError, match="0 epoch record"):
        plots.plot_history([])
    with pytest.raises(ValueError, match="unknown metrics"):
        plots.plot_history(records(), metrics=("f1",))
    with pytest.raises(TypeError, match="fit\\(\\) returns"):
        plots.plot_history(3.5)


# ---------------------------------------------------------------- confusion


def test_confusion_matrix_shows_counts_names_and_accuracy():
    targets = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    fig = plots.plot_confusion_matrix(targets, preds, NAMES)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted class"
    assert ax.get_ylabel() == "true class"
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    # Zero cells stay blank so that the mistakes stand out.
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])):
             t.get_text() for t in ax.texts}
    assert cells == {(0, 0): "1", (0, 1): "1", (1, 1): "2", (2, 0): "1",
                     (2, 2): "1"}
    assert "66.7%" in ax.get_title()


def test_confusion_matrix_normalized_rows_sum_to_one():
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 2])
    fig = plots.plot_confusion_matrix(targets, preds, NAMES,
                                      normalize="true")
    data = np.asarray(fig.axes[0].images[0].get_array())
    assert np.allclose(data.sum(axis=1), 1.0)
    assert [t.get_text() for t in fig.axes[0].texts][:2] == ["33%", "67%"]


def test_confusion_matrix_takes_predictions_object_and_scores():
    scores = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]])
    pred_obj = SimpleNamespace(targets=[0, 1, 1], preds=scores)
    fig = plots.plot_confusion_matrix(pred_obj, class_names=NAMES)
    assert "66.7%" in fig.axes[0].get_title()


def test_confusion_matrix_rejects_mismatched_lengths_and_names():
    with pytest.raises(ValueError, match="same length"):
        plots.plot_confusion_matrix([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion_matrix([0, 1, 2], [0, 1, 2], ["a", "b"])
    with pytest.raises(ValueError, match="normalize"):
        plots.plot_confusion_matrix([0, 1], [0, 1], normalize="rows")


# ---------------------------------------------------------------- images


def _framed(ax):
    spines = ax.spines.values()
    return all(s.get_visible() for s in spines)


def test_show_predictions_frames_only_the_mistakes():
    images = torch.rand(5, 3, 8, 8)
    targets = [0, 1, 2, 0, 1]
    preds = [0, 2, 2, 1, 1]
    probs = torch.full((5, 3), 1 / 3)
    fig = plots.show_predictions(images, targets, preds, NAMES, probs=probs,
                                 ncols=5)
    axes = fig.axes[:5]
    assert [_framed(ax) for ax in axes] == [False, True, False, True, False]
    assert "true: square" in axes[1].get_title()
    assert "true:" not in axes[0].get_title()
    assert "(33%)" in axes[0].get_title()
    assert "3 of 5 correct" in fig._suptitle.get_text()


def test_show_predictions_can_put_mistakes_first():
    images = [Image.new("RGB", (6, 6), c) for c in ("red", "blue", "green")]
    fig = plots.show_predictions(images, [0, 1, 2], [0, 1, 0], NAMES,
                                 mistakes_first=True)
    assert _framed(fig.axes[0]) and not _framed(fig.axes[1])


def test_show_predictions_needs_one_label_per_image():
    with pytest.raises(ValueError, match="one target and one prediction"):
        plots.show_predictions(torch.rand(3, 3, 4, 4), [0, 1], [0, 1, 2])


def test_show_batch_undoes_the_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    raw = torch.rand(4, 3, 6, 6)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    batch = (raw - m) / s
    fig = plots.show_batch((batch, torch.tensor([0, 1, 2, 0])),
                           class_names=NAMES, mean=mean, std=std)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert np.allclose(shown, raw[0].permute(1, 2, 0).numpy(), atol=1e-5)
    assert fig.axes[1].get_title() == "square"


def test_show_batch_stretches_unknown_normalisation_into_view():
    fig = plots.show_batch(torch.randn(2, 3, 5, 5) * 3)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown.min() >= 0 and shown.max() <= 1


# ---------------------------------------------------------------- filters


def test_plot_filters_shows_each_first_layer_filter_scaled():
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 7, 3))
    fig = plots.plot_filters(net)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 5
    for im in images:
        data = np.asarray(im.get_array())
        assert data.shape == (3, 3, 3)
        assert data.min() == pytest.approx(0) and data.max() == \
            pytest.approx(1)
    assert "5 of 5" in fig._suptitle.get_text()


def test_plot_filters_finds_the_first_rgb_conv_of_a_wrapped_model():
    net = toy_net()
    pretrained_like = SimpleNamespace(model=net, meta={})
    name, conv = plots.first_conv(pretrained_like)
    assert name == "stem.0" and conv is net.stem[0]
    fig = plots.plot_filters(pretrained_like, max_filters=4)
    assert sum(1 for ax in fig.axes if ax.images) == 4


def test_plot_filters_explains_a_model_without_rgb_conv():
    with pytest.raises(ValueError, match="3 input channels"):
        plots.plot_filters(nn.Sequential(nn.Linear(4, 2)))


# ---------------------------------------------------------------- features


def test_feature_maps_keeps_each_spatial_stage_and_cleans_up():
    net = toy_net().train()
    maps = plots.feature_maps(net, torch.rand(3, 16, 16))
    assert list(maps) == ["stem", "body"]  # the head is not spatial
    assert tuple(maps["stem"].shape) == (6, 16, 16)
    assert tuple(maps["body"].shape) == (8, 8, 8)
    assert net.training  # the mode is restored
    assert all(not m._forward_hooks for m in net.modules())


def test_feature_maps_accepts_explicit_groups_and_pil_images():
    net = toy_net()
    pre = SimpleNamespace(model=net, meta={"mean": (0.5,) * 3,
                                           "std": (0.5,) * 3},
                          transform=None)
    maps = plots.feature_maps(pre, Image.new("RGB", (10, 10), "red"),
                              groups={"early": net.stem[0]})
    assert list(maps) == ["early"]
    assert tuple(maps["early"].shape) == (6, 10, 10)


def test_plot_feature_maps_draws_one_row_per_stage():
    fig = plots.plot_feature_maps(toy_net(), torch.rand(3, 16, 16),
                                  channels=4)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["stem\n6x16x16", "body\n8x8x8"]
    assert sum(1 for ax in fig.axes if ax.images) == 1 + 2 * 4


def test_plot_feature_maps_shows_the_most_active_channels():
    fmap = torch.zeros(4, 3, 3)
    fmap[2] = 5.0
    fmap[2, 0, 0] = 6.0
    fig = plots.plot_feature_maps({"only": fmap}, channels=1)
    assert fig.axes[0].get_title() == "ch 2"


def test_plot_feature_maps_rejects_unknown_stages():
    with pytest.raises(ValueError, match="unknown stage"):
        plots.plot_feature_maps(toy_net(), torch.rand(3, 8, 8),
                                stages=["nope"])


# ---------------------------------------------------------------- embeddings


def _clusters(n=30, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    return rng.normal(size=(n, dim)) + 4 * labels[:, None], labels


def test_plot_embeddings_pca_colours_points_by_class():
    x, y = _clusters()
    fig = plots.plot_embeddings(torch.tensor(x), y, NAMES)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("PC 1 (")
    assert "variance" in ax.get_ylabel()
    assert legend_labels(ax) == NAMES
    assert sum(len(c.get_offsets()) for c in ax.collections) == 30


def test_plot_embeddings_tsne_and_features_object():
    x, y = _clusters(n=24)
    feats = SimpleNamespace(features=torch.tensor(x), labels=torch.tensor(y))
    fig = plots.plot_embeddings(feats, class_names=NAMES, method="tsne")
    assert fig.axes[0].get_xlabel() == "t-SNE 1"


def test_plot_embeddings_side_by_side_for_a_dict():
    x, y = _clusters()
    noise = np.random.default_rng(1).normal(size=x.shape)
    fig = plots.plot_embeddings({"pretrained": (x, y), "random": (noise, y)},
                                class_names=NAMES)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["pretrained (12-d)", "random (12-d)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == NAMES


def test_plot_embeddings_draws_into_a_given_axis():
    fig, axes = plots._subplots(1, 2)
    x, y = _clusters()
    out = plots.plot_embeddings(x, y, ax=axes[0, 1])
    assert out is fig and axes[0, 1].collections and \
        not axes[0, 0].collections


def test_plot_embeddings_explains_bad_inputs():
    x, y = _clusters()
    with pytest.raises(ValueError, match="one label per feature"):
        plots.plot_embeddings(x, y[:-1])
    with pytest.raises(ValueError, match="'pca' or 'tsne'"):
        plots.plot_embeddings(x, y, method="umap")


# ---------------------------------------------------------------- timeline


def _bars(ax):
    return [p for p in ax.patches if p.get_width() == 1.0]


def test_unfreezing_timeline_from_recorded_learning_rates():
    fig = plots.plot_unfreezing_timeline(records(6, unfreeze_at=4))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage7",
                                                            "head"]
    assert ax.get_xlabel() == "epoch"
    assert len(_bars(ax)) == 2 * 6
    lr_labels = [t.get_text() for t in ax.texts]
    assert lr_labels.count("2e-4") == 3 and lr_labels.count("1e-3") == 6
    assert fig.axes[1].get_ylabel() == "learning rate"  # the colour bar


def test_unfreezing_timeline_extends_a_schedule_to_all_epochs():
    schedule = {1: ["head"], 3: ["head", "stage2"]}
    fig = plots.plot_unfreezing_timeline(schedule, epochs=5)
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3, 4, 5]
    grey = [p for p in _bars(ax)
            if matplotlib.colors.to_hex(p.get_facecolor()) == "#e6e6e6"]
    assert len(grey) == 2  # stage2 frozen in epochs 1 and 2


def test_unfreezing_timeline_names_the_forms_it_takes():
    with pytest.raises(ValueError, match="a History from fit"):
        plots.plot_unfreezing_timeline([{"epoch": 1, "group": "head"}])


# ---------------------------------------------------------------- strategies


def test_strategy_comparison_annotates_each_bar_for_the_largest_size():
    fig = plots.plot_strategy_comparison(strategy_table(), chance=1 / 3)
    acc_ax = fig.axes[0]
    # Table order, top to bottom.
    ticks = sorted(zip(acc_ax.get_yticks(), acc_ax.get_yticklabels()),
                   key=lambda pair: -pair[0])
    assert [label.get_text() for _, label in ticks] == [
        "from scratch", "linear probe", "full fine-tuning"]
    assert " 90.0%" in [t.get_text() for t in acc_ax.texts]
    assert "10 labels per class" in fig._suptitle.get_text()
    assert [ax.get_xlabel() for ax in fig.axes] == [
        "accuracy", "trainable parameters (log)", "wall time (s)"]
    assert fig.axes[1].get_xscale() == "log"


def test_strategy_comparison_averages_repeated_runs():
    rows = [{"strategy": "a", "accuracy": 0.5},
            {"strategy": "a", "accuracy": 0.7},
            {"strategy": "b", "accuracy": 0.9}]
    fig = plots.plot_strategy_comparison(rows)
    assert len(fig.axes) == 1
    assert " 60.0%" in [t.get_text() for t in fig.axes[0].texts]


def _seed_rows():
    """Rows as compare_strategies(seeds=[0, 1, 2]) summarises them."""
    return [{"strategy": "fine_tuning", "labels_per_class": k,
             "accuracy": acc, "accuracy_min": acc - 0.1,
             "accuracy_max": acc + 0.05}
            for k, acc in ((5, 0.6), (10, 0.8))]


def test_strategy_comparison_draws_the_spread_across_seeds():
    fig = plots.plot_strategy_comparison(_seed_rows())
    ax = fig.axes[0]
    segments = [seg for coll in ax.collections
                for seg in coll.get_segments()]
    assert segments, "an error bar"
    xs = sorted(x for seg in segments for x, _ in seg)
    assert xs[0] == pytest.approx(0.7) and xs[-1] == pytest.approx(0.85)


def test_learning_curves_draw_the_spread_as_a_band():
    fig = plots.plot_learning_curves(_seed_rows())
    ax = fig.axes[0]
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.5)
    assert band[:, 1].max() == pytest.approx(0.85)


def test_strategy_comparison_explains_a_missing_column():
    with pytest.raises(ValueError, match="no 'strategy' column"):
        plots.plot_strategy_comparison([{"accuracy": 0.5}])
    with pytest.raises(ValueError, match="no 'f1' column"):
        plots.plot_strategy_comparison(strategy_table(), metric="f1")


def test_learning_curves_draw_one_line_per_strategy():
    fig = plots.plot_learning_curves(strategy_table(), chance=1 / 3)
    ax = fig.axes[0]
    assert legend_labels(ax) == ["from scratch", "linear probe",
                                 "full fine-tuning", "chance"]
    assert ax.get_xlabel() == "labelled images per class"
    assert list(ax.lines[0].get_xdata()) == [1, 5, 10]
    assert ax.get_xscale() == "log"


# ---------------------------------------------------------------- LR finder


def test_lr_finder_plot_marks_the_suggestion_on_a_log_axis():
    fig = plots.plot_lr_finder(lr_result())
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_ylabel() == "loss"
    assert "suggestion: 1.0e-04" in legend_labels(ax)
    vertical = _at_x(ax, 1e-4)
    assert len(vertical) == 2  # the dashed line and the dot


def test_lr_finder_plot_without_suggestion_and_bad_input():
    fig = plots.plot_lr_finder({"lrs": [1e-5, 1e-4, 1e-3],
                                "losses": [1.0, 0.8, 2.0],
                                "suggestion": None})
    assert fig.axes[0].get_legend() is None
    with pytest.raises(ValueError, match="one loss per learning rate"):
        plots.plot_lr_finder({"lrs": [1e-5, 1e-4], "losses": [1.0]})


# ---------------------------------------------------------------- all plots


def all_plots():
    x, y = _clusters()
    return OrderedDict([
        ("history", lambda: plots.plot_history(history_obj())),
        ("history_compare", lambda: plots.plot_history(
            {"a": records(), "b": records()})),
        ("confusion", lambda: plots.plot_confusion_matrix(
            [0, 1, 2], [0, 2, 2], NAMES)),
        ("predictions", lambda: plots.show_predictions(
            torch.rand(3, 3, 8, 8), [0, 1, 2], [0, 2, 2], NAMES)),
        ("batch", lambda: plots.show_batch(torch.rand(3, 3, 8, 8))),
        ("filters", lambda: plots.plot_filters(toy_net())),
        ("feature_maps", lambda: plots.plot_feature_maps(
            toy_net(), torch.rand(3, 12, 12), channels=3)),
        ("embeddings", lambda: plots.plot_embeddings(x, y, NAMES)),
        ("timeline", lambda: plots.plot_unfreezing_timeline(records())),
        ("strategies", lambda: plots.plot_strategy_comparison(
            strategy_table())),
        ("learning_curves", lambda: plots.plot_learning_curves(
            strategy_table())),
        ("lr_finder", lambda: plots.plot_lr_finder(lr_result())),
    ])


@pytest.mark.parametrize("name", list(all_plots()))
def test_every_plot_saves_a_png_and_never_calls_show(name, tmp_path,
                                                     monkeypatch):
    plt = plots._pyplot()

    def refuse(*args, **kwargs):
        raise AssertionError("plots must not call plt.show()")

    monkeypatch.setattr(plt, "show", refuse)
    fig = all_plots()[name]()
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 2000
    assert plots.figure_to_png(fig)[:4] == b"\x89PNG"


def test_a_returned_figure_shows_once_and_leaves_pyplot(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display",
                        lambda obj, **kw: shown.append(obj))
    plt = plots._pyplot()
    fig = plots.plot_lr_finder(lr_result())
    assert plt.fignum_exists(fig.number)
    fig._ipython_display_()  # the cell's last value
    assert len(shown) == 1 and shown[0].data[:4] == b"\x89PNG"
    # Out of pyplot: the inline backend will not draw it a second time.
    assert not plt.fignum_exists(fig.number)
    fig._ipython_display_()  # shown again in a later cell
    assert len(shown) == 2


def _backend_after_plot(env_update):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    env.update(env_update)
    code = ("from tlhelpers import plots; import matplotlib;"
            "plots.plot_confusion_matrix([0, 1], [0, 1]);"
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=120,
                         check=True)
    return out.stdout.strip().lower()


def test_plots_work_headless_and_respect_a_chosen_backend():
    assert _backend_after_plot({}) == "agg"
    assert _backend_after_plot({"MPLBACKEND": "svg"}) == "svg"


def test_plots_call_no_private_matplotlib_api():
    """Only matplotlib's public names: private ones change without notice."""
    import ast

    tree = ast.parse(open(plots.__file__, encoding="utf-8").read())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("matplotlib"):
            names = node.module.split(".") + [a.name for a in node.names]
            private += [n for n in names if n.startswith("_")]
        elif isinstance(node, ast.Import):
            private += [a.name for a in node.names
                        if a.name.startswith("matplotlib")
                        and "._" in a.name]
        elif isinstance(node, ast.Attribute) and \
                node.attr.startswith("_") and \
                not node.attr.startswith("__") and \
                isinstance(node.value, ast.Name) and \
                node.value.id in ("matplotlib", "mpl", "plt", "rcsetup"):
            private.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and \
                getattr(node.func, "id", None) == "getattr" and \
                len(node.args) > 1 and \
                isinstance(node.args[1], ast.Constant) and \
                str(node.args[1].value).startswith("_") and \
                not str(node.args[1].value).startswith("__"):
            private.append(f"getattr(..., {node.args[1].value!r})")
    assert private == []


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_backbone_filters_and_feature_maps():
    from tlhelpers import models

    pre = models.load_pretrained("efficientnet_lite0", image_size=64)
    fig = plots.plot_filters(pre)
    assert "conv_stem (32 of 32, 3x3" in fig._suptitle.get_text()
    maps = plots.feature_maps(pre, torch.zeros(3, 64, 64))
    assert list(maps)[:2] == ["stem", "stage1"] and "head" not in maps
    assert list(maps)[-1] == "neck"


def test_unfreezing_timeline_of_a_gradual_unfreezing_plan():
    plan = [("head", 1, 1e-3), ("stage7", 2, 1e-3 / 2.6),
            ("stage6", 4, 1e-3 / 2.6 ** 2)]
    schedule = SimpleNamespace(timeline=lambda: plan)
    fig = plots.plot_unfreezing_timeline(
        schedule, epochs=5, groups=["stem", "stage6", "stage7", "head"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "stem", "stage6", "stage7", "head"]
    labels = [t.get_text() for t in ax.texts]
    assert labels.count("1e-3") == 5
    assert labels.count("3.8e-4") == 4
    assert labels.count("1.5e-4") == 2
    grey = [p for p in _bars(ax)
            if matplotlib.colors.to_hex(p.get_facecolor()) == "#e6e6e6"]
    assert len(grey) == 5 + 1 + 3  # stem never trains


def test_show_predictions_takes_a_predictions_object():
    pred = SimpleNamespace(targets=torch.tensor([0, 1]),
                           preds=torch.tensor([0, 0]),
                           probs=torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
    fig = plots.show_predictions(torch.rand(2, 3, 4, 4), pred,
                                 class_names=NAMES)
    assert fig.axes[0].get_title().startswith("circle (90%)")
    assert "true: square" in fig.axes[1].get_title()


@pytest.mark.slow
def test_a_notebook_shows_each_plot_exactly_once(tmp_path):
    """In a real kernel with the inline backend, as learners run it."""
    import nbformat
    from nbclient import NotebookClient

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cells = [
        "from tlhelpers import plots\n"
        "rows = [{'epoch': e, 'train_loss': 1 / e} for e in (1, 2, 3)]",
        "plots.plot_history(rows)",            # the cell's last value
        "fig = plots.plot_history(rows)",      # kept in a variable
        "fig",                                 # shown again later
        "plots.plot_history(rows)\nplots.plot_history(rows);",
    ]
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c) for c in cells])
    env = dict(os.environ,
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": root}}).execute(env=env)
    images = [sum("image/png" in o.get("data", {}) for o in c.outputs)
              for c in nb.cells]
    assert images == [0, 1, 1, 1, 2]


def test_images_in_every_layout_show_in_the_unit_range():
    hwc = (np.random.default_rng(0).random((6, 6, 3)) * 255).astype(
        np.uint8)
    chw_tensor = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255
    grey = np.linspace(0, 1, 36).reshape(6, 6)
    pil = Image.fromarray(hwc)
    fig = plots.show_batch([hwc, chw_tensor, grey, pil], ncols=4)
    shown = [np.asarray(ax.images[0].get_array()) for ax in fig.axes[:4]]
    assert np.allclose(shown[0], hwc / 255) and np.allclose(shown[1],
                                                             hwc / 255)
    assert np.allclose(shown[3], hwc / 255) and shown[2].shape == (6, 6)
