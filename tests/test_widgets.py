"""Tests for tlhelpers.widgets: built and driven headless, as in CI."""

import base64
import io
from types import SimpleNamespace

import ipywidgets
import pytest
import torch
from torch import nn

from tlhelpers import models, plots, widgets

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(autouse=True)
def _close_figures():
    """No figure left open."""
    yield
    plots._pyplot().close("all")


class ToyNet(nn.Module):
    """Three small groups (stem, body, head) so freezing can be checked."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def record(epoch, events=False):
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.5,
            "val_loss": 1.1 / epoch, "val_acc": 0.8,
            "lrs": {"head": 1e-3, "head+no_decay": 1e-3}, "time": 0.25}


def growing_history(n):
    return SimpleNamespace(
        epochs=[record(e) for e in range(1, n + 1)],
        events=[{"epoch": 2, "kind": "unfreeze", "group": "body",
                 "lr": 4e-4}],
        best_epoch=n)


# ---------------------------------------------------------------- live plot


class FakeHandle:
    """Records what a display handle was asked to show."""

    def __init__(self, shown):
        self.shown = shown

    def update(self, obj, **kwargs):
        self.shown.append(("update", obj, kwargs))


def fake_display(monkeypatch):
    """Stand in for IPython's display(); return the list of calls."""
    import IPython.display

    shown = []

    def display(obj, **kwargs):
        shown.append(("display", obj, kwargs))
        return FakeHandle(shown) if kwargs.get("display_id") else None

    monkeypatch.setattr(IPython.display, "display", display)
    return shown


def test_live_plot_auto_mode_prints_outside_a_notebook_kernel():
    assert widgets.LivePlot().mode == "text"


def test_live_plot_in_a_kernel_redraws_through_one_display_handle(
        monkeypatch):
    monkeypatch.setattr(widgets, "_in_kernel", lambda: True)
    shown = fake_display(monkeypatch)
    live = widgets.LivePlot(epochs=3)
    assert live.mode == "display"
    for n in (1, 2, 3):
        live.update(growing_history(n))
    live.close()
    kinds = [kind for kind, _, _ in shown]
    assert kinds == ["display", "update", "update"]
    assert shown[0][2] == {"raw": True, "display_id": True}
    last = shown[-1][1]
    assert last["text/plain"].startswith("epoch 3/3")
    assert base64.b64decode(last["image/png"]) == live.png
    assert live.png[:4] == b"\x89PNG"
    assert plots._pyplot().get_fignums() == []  # no second inline copy


def test_live_plot_for_a_layout_draws_in_its_own_output_widget(
        monkeypatch):
    monkeypatch.setattr(widgets, "_in_kernel", lambda: True)
    shown = fake_display(monkeypatch)
    live = widgets.LivePlot(autodisplay=False)
    assert live.mode == "widget"
    assert isinstance(live.widget, ipywidgets.Output)
    live.update(growing_history(1))
    live.update(growing_history(2))
    # Each epoch redraws inside the Output (a handle updated outside its
    # `with` block never reaches the widget in JupyterLab).
    assert [kind for kind, _, _ in shown] == ["display", "display"]
    assert all(kw == {"raw": True} for _, _, kw in shown)
    assert shown[-1][1]["text/plain"].startswith("epoch 2")
    live.reset()  # a new run draws again in the cleared widget
    live.update(growing_history(1))
    assert [kind for kind, _, _ in shown][-1] == "display"
    assert shown[-1][1]["text/plain"].startswith("epoch 1")


def test_live_plot_run_headless_keeps_the_final_figure_in_the_notebook(
        tmp_path):
    """nbclient (tlcourse run, nbval) saves what the handle showed last."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from tlhelpers import runner

    code = ("from tlhelpers.widgets import LivePlot\n"
            "live = LivePlot(epochs=3)\n"
            "for n in (1, 2, 3):\n"
            "    live.update([{'epoch': e, 'train_loss': 1 / e,\n"
            "                  'val_acc': 0.5} for e in range(1, n + 1)])\n"
            "print(live.mode)")
    nb_path = tmp_path / "01_live.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(code)]), nb_path)
    result = runner.execute_notebook(nb_path, tmp_path / "out", timeout=120)
    assert result.status == "passed", result.error
    outputs = nbformat.read(result.ipynb, as_version=4).cells[0].outputs
    figures = [o for o in outputs if o.output_type == "display_data"]
    assert len(figures) == 1, outputs  # one figure, updated in place
    assert figures[0].data["text/plain"].startswith("epoch 3/3")
    assert base64.b64decode(figures[0].data["image/png"])[:4] == \
        b"\x89PNG"
    assert "display" in "".join(o.get("text", "") for o in outputs)


def test_live_plot_text_mode_prints_each_epoch_once(capsys):
    live = widgets.LivePlot(mode="text", epochs=3)
    for n in (1, 2, 3):
        live.update(growing_history(n))
    live.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines == live.lines
    assert lines[0].startswith("epoch 1/3")
    assert "val_acc 80.0%" in lines[0] and "lr 1.0e-03" in lines[0]
    assert "unfroze body" in lines[1] and "unfroze" not in lines[2]
    assert live.closed


def test_live_plot_follows_a_new_run_after_a_shorter_history():
    out = io.StringIO()
    live = widgets.LivePlot(mode="text", file=out)
    live.update(growing_history(3))
    live.update(growing_history(1))
    assert out.getvalue().count("epoch 1") == 2


def test_live_plot_widget_mode_redraws_a_figure(monkeypatch):
    live = widgets.LivePlot(mode="widget", epochs=4)
    assert isinstance(live.widget, ipywidgets.Output)
    live.update(growing_history(1))
    first = live.png
    live.update(growing_history(2))
    assert first[:4] == b"\x89PNG" and live.png[:4] == b"\x89PNG"
    assert live.png != first and live.updates == 2
    assert plots._pyplot().get_fignums() == []  # closed after drawing
    assert "text/plain" in live._repr_mimebundle_()


def test_live_plot_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        widgets.LivePlot(mode="gui")


def test_live_plot_works_as_fit_live_argument(capsys):
    from tlhelpers import training

    torch.manual_seed(0)
    net = ToyNet()
    x, y = torch.rand(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4)
    live = widgets.LivePlot(mode="text", epochs=2)
    training.fit(net, loader, loader, torch.optim.SGD(net.parameters(), 0.1),
                 2, progress=False, live=live, device="cpu")
    assert len(live.lines) == 2 and live.closed
    assert "epoch 2/2" in capsys.readouterr().out


# ---------------------------------------------------------------- explorer


def fake_train(calls):
    def train_fn(backbone, strategy, groups, lr, epochs, live):
        calls.append(dict(backbone=backbone, strategy=strategy,
                          groups=groups, lr=lr, epochs=epochs))
        for n in range(1, epochs + 1):
            live.update(growing_history(n))
        return growing_history(epochs)
    return train_fn


def explorer(calls, **kw):
    return widgets.training_explorer(
        train_fn=fake_train(calls), backbones=["toy", "other"],
        max_groups=3, live_mode="text", **kw)


def test_explorer_groups_slider_only_counts_for_last_k_groups():
    ex = explorer([])
    assert ex.groups.disabled
    ex.strategy.value = "last k groups"
    assert not ex.groups.disabled
    ex.groups.value = 3
    assert "last 3 layer groups" in ex.plan.value
    ex.strategy.value = "naive fine-tuning"
    assert ex.groups.disabled and "every layer" in ex.plan.value
    assert ex.settings()["groups"] is None


def test_explorer_run_button_trains_with_the_chosen_settings():
    calls = []
    ex = explorer(calls, epochs=2)
    ex.backbone.value = "other"
    ex.strategy.value = "last k groups"
    ex.groups.value = 2
    ex.lr.value = 1e-4
    ex.run_button.click()
    assert calls == [dict(backbone="other", strategy="last k groups",
                          groups=2, lr=pytest.approx(1e-4), epochs=2)]
    assert ex.status.value == "done: validation accuracy 80.0%"
    assert len(ex.live.lines) == 2 and not ex.run_button.disabled
    assert isinstance(ex.widget, ipywidgets.VBox)


def test_explorer_shows_a_failure_and_stays_usable():
    def broken(**kwargs):
        raise RuntimeError("weights for resnet50 are not on this machine")

    ex = widgets.training_explorer(train_fn=broken, backbones=["resnet50"],
                                   max_groups=4, live_mode="text")
    assert ex.run() is None
    assert "failed: RuntimeError: weights for resnet50" in ex.status.value
    assert isinstance(ex.error, RuntimeError)
    assert not ex.run_button.disabled


def test_explorer_reads_the_group_count_of_a_real_backbone():
    ex = widgets.training_explorer(train_fn=fake_train([]),
                                   backbones=["efficientnet_lite0"],
                                   live_mode="text")
    assert ex.groups.max == len(models.load_pretrained(
        "efficientnet_lite0", weights=None).groups)


# Toy nets use the grouping by top-level children, which warns.
@pytest.mark.filterwarnings("ignore:no known layer grouping")
def test_apply_strategy_freezes_the_right_groups():
    net = ToyNet()
    widgets.apply_strategy(net, "head only")
    assert list(models.group_status(net).values()) == [False, False, True]
    widgets.apply_strategy(net, "last k groups", groups=2)
    assert list(models.group_status(net).values()) == [False, True, True]
    widgets.apply_strategy(net, "naive_fine_tuning")
    assert all(models.group_status(net).values())
    widgets.apply_strategy(net, "head only")
    widgets.apply_strategy(net, "full fine-tuning")   # the former name
    assert all(models.group_status(net).values())
    with pytest.raises(ValueError, match="between 1 and 3"):
        widgets.apply_strategy(net, "last k groups", groups=7)
    with pytest.raises(ValueError, match="unknown strategy"):
        widgets.apply_strategy(net, "everything")


# ---------------------------------------------------------------- browser


def test_feature_map_browser_slider_switches_stage():
    torch.manual_seed(0)
    browser = widgets.feature_map_browser(ToyNet(), torch.rand(3, 12, 12),
                                          channels=3)
    assert list(browser.slider.options) == ["stem", "body"]
    assert browser.stage == "stem" and browser.png[:4] == b"\x89PNG"
    assert browser.output.value == browser.png
    first = browser.png
    browser.slider.value = "body"  # fires the observer, as a drag would
    assert browser.stage == "body" and browser.png != first
    assert browser.output.value == browser.png  # the widget shows it
    browser.show(0)
    assert browser.stage == "stem"
    assert plots._pyplot().get_fignums() == []


def test_feature_map_browser_draws_into_an_image_widget_not_an_output():
    """An Output widget would make a headless run hang (nbclient #312)."""
    browser = widgets.feature_map_browser(ToyNet(), torch.rand(3, 8, 8))
    assert isinstance(browser.output, ipywidgets.Image)
    assert not any(isinstance(w, ipywidgets.Output)
                   for w in browser.widget.children)


def test_feature_map_browser_unwatched_shows_a_static_figure(monkeypatch):
    monkeypatch.setenv("TLH_PROGRESS", "0")
    browser = widgets.feature_map_browser(ToyNet(), torch.rand(3, 8, 8))
    bundle = browser._repr_mimebundle_()
    assert WIDGET_VIEW not in bundle
    assert base64.b64decode(bundle["image/png"]) == browser.png
    assert bundle["image/png"] in bundle["text/html"]
    assert bundle["text/plain"] == browser.note()
    assert "layer group 1 of 2 (stem)" in browser.note()


def test_feature_map_browser_watched_shows_the_widget_with_a_fallback(
        monkeypatch):
    monkeypatch.delenv("TLH_PROGRESS", raising=False)
    browser = widgets.feature_map_browser(ToyNet(), torch.rand(3, 8, 8))
    browser.show("body")
    bundle = browser._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"] == browser.widget.model_id
    assert base64.b64decode(bundle["image/png"]) == browser.png
    assert "layer group 2 of 2 (body)" in bundle["text/plain"]


def test_explorer_unwatched_is_a_one_line_note(monkeypatch):
    ex = explorer([])
    monkeypatch.setenv("TLH_PROGRESS", "0")
    assert list(ex._repr_mimebundle_()) == ["text/plain"]
    monkeypatch.setenv("TLH_PROGRESS", "1")
    bundle = ex._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"] == ex.widget.model_id
    assert bundle["text/plain"].startswith("Training explorer")


BROWSER_CELLS = [
    "import torch\n"
    "from torch import nn\n"
    "from tlhelpers.widgets import FeatureMapBrowser\n"
    "class ToyNet(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))\n"
    "        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2),\n"
    "                                  nn.AdaptiveAvgPool2d(1),\n"
    "                                  nn.Flatten())\n"
    "        self.head = nn.Linear(6, 3)\n"
    "    def forward(self, x):\n"
    "        return self.head(self.body(self.stem(x)))\n"
    "browser = FeatureMapBrowser(ToyNet(), torch.rand(3, 12, 12))\n"
    "browser",
    "for stage in ['body', 'stem'] * 10:  # as a learner drags the slider\n"
    "    browser.slider.value = stage\n"
    "print(browser.stage)",
]


@pytest.mark.parametrize("watched", [False, True],
                         ids=["TLH_PROGRESS=0", "TLH_PROGRESS=1"])
def test_feature_map_browser_run_headless_finishes_and_keeps_a_figure(
        tmp_path, watched):
    """nbclient (tlcourse run) runs the browser's cells to the end."""
    import os

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from tlhelpers import runner

    nb_path = tmp_path / "01_browser.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(c)
                                       for c in BROWSER_CELLS]), nb_path)
    env = runner.kernel_env(dict(os.environ,
                                 TLH_PROGRESS="1" if watched else "0"))
    result = runner.execute_notebook(nb_path, tmp_path / "out",
                                     timeout=120, env=env)
    assert result.status == "passed", result.error
    nb = nbformat.read(result.ipynb, as_version=4)
    shown = [o for o in nb.cells[0].outputs
             if o.output_type == "execute_result"]
    assert len(shown) == 1, nb.cells[0].outputs
    assert base64.b64decode(shown[0].data["image/png"])[:4] == b"\x89PNG"
    assert (WIDGET_VIEW in shown[0].data) == watched
    assert ("text/html" in shown[0].data) != watched
    printed = "".join(o.get("text", "") for o in nb.cells[1].outputs
                      if o.get("name") == "stdout")
    assert printed.strip() == "stem"
    # The drawing is an Image widget; no Output widget was ever made (a
    # display into one is what hangs nbclient).
    state = nb.metadata.get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})
    models = {m["model_name"] for m in state.values()}
    assert "ImageModel" in models and "OutputModel" not in models, models


def test_feature_map_browser_explains_an_unknown_stage():
    browser = widgets.feature_map_browser(ToyNet(), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="unknown stage 'head'"):
        browser.show("head")
    with pytest.raises(ValueError, match="out of range"):
        browser.show(5)


@pytest.mark.slow
def test_explorer_runs_a_real_short_training():
    ex = widgets.training_explorer(backbones=["efficientnet_lite0"],
                                   epochs=1, live_mode="widget")
    ex.strategy.value = "head only"
    history = ex.run()
    assert ex.error is None, ex.error
    assert len(history.epochs) == 1 and ex.live.png[:4] == b"\x89PNG"
    assert ex.status.value.startswith("done: validation accuracy")


def test_explorer_names_its_strategies_from_the_one_vocabulary():
    from tlhelpers import strategies

    assert widgets.STRATEGIES == tuple(
        strategies.STRATEGIES[n].label for n in widgets.STRATEGY_NAMES)
