"""Tests for tlhelpers.widgets: built and driven headless, as in CI."""

import io
from types import SimpleNamespace

import ipywidgets
import pytest
import torch
from torch import nn

from tlhelpers import models, plots, widgets


@pytest.fixture(autouse=True)
def _close_figures(monkeypatch):
    """No TLH_LIVE from the caller's shell; no figure left open."""
    monkeypatch.delenv("TLH_LIVE", raising=False)
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


# ---------------------------------------------------------------- front end


class FakeShell:
    kernel = object()


def test_no_frontend_in_plain_python():
    assert widgets.has_frontend(environ={}) is False
    assert widgets.has_frontend(shell=SimpleNamespace(kernel=None),
                                environ={}) is False


def test_frontend_when_a_jupyter_server_opened_the_notebook():
    env = {"JPY_SESSION_NAME": "04_progressive_unfreezing.ipynb"}
    assert widgets.has_frontend(shell=FakeShell(), environ=env) is True


def test_no_frontend_in_kernels_run_by_test_and_ci_tools():
    for cmd in ("python -m pytest --nbval-lax notebooks",
                "jupyter-nbconvert --execute x.ipynb",
                "python -m papermill a.ipynb b.ipynb"):
        assert widgets.has_frontend(shell=FakeShell(), environ={},
                                    parent_cmdline=cmd) is False
    assert widgets.has_frontend(shell=FakeShell(), environ={},
                                parent_cmdline="jupyter-lab") is True


def test_tlh_live_overrides_the_guess():
    assert widgets.has_frontend(environ={"TLH_LIVE": "widget"}) is True
    assert widgets.has_frontend(shell=FakeShell(),
                                environ={"TLH_LIVE": "text",
                                         "JPY_SESSION_NAME": "x"}) is False


# ---------------------------------------------------------------- live plot


def test_live_plot_auto_mode_prints_when_nobody_can_see_widgets():
    assert widgets.LivePlot().mode == "text"


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
    ex.strategy.value = "full fine-tuning"
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
    widgets.apply_strategy(net, "full_fine_tuning")
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
    first = browser.png
    browser.slider.value = "body"  # fires the observer, as a drag would
    assert browser.stage == "body" and browser.png != first
    browser.show(0)
    assert browser.stage == "stem"
    assert plots._pyplot().get_fignums() == []


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
