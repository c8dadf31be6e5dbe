"""The course's widgets in JupyterLab: they render, and they react.

A scratch notebook (written by the test into the server's private copy)
shows the widgets that no course notebook drives through their whole
use; the test runs it through the UI, then changes a control and checks
that the widget's output changed:

- TrainingExplorer: pick another strategy and a learning rate; the plan
  says so. Press Run; training ends ("done") and the live plot under
  it was redrawn for every epoch.
- LivePlot: its figure is redrawn while `fit` runs (the page records
  every image drawn, and whether the cell was still running), and the
  saved notebook keeps the final figure.

The feature-map browser is tested in notebook 01, where it teaches
(test_ui_notebooks.py).
"""

import base64
import json
import time
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.ui, pytest.mark.slow]

SHOTS = Path(__file__).resolve().parents[2] / "_build" / "ui"

EPOCHS = 3
SCRATCH = "ui_widgets_scratch.ipynb"
CELLS = [
    # 0: the training explorer (its Run button trains briefly)
    "from tlhelpers.widgets import TrainingExplorer\n"
    "explorer = TrainingExplorer(backbones=['efficientnet_lite0'],\n"
    "                            epochs=2)\n"
    "explorer",
    # 1: a live plot during fit
    "import torch\n"
    "from torch.utils.data import DataLoader, TensorDataset\n"
    "from tlhelpers.training import fit\n"
    "from tlhelpers.widgets import LivePlot\n"
    "torch.manual_seed(0)\n"
    "x = torch.randn(2048, 16)\n"
    "y = (x[:, 0] + x[:, 1] > 0).long()\n"
    "loader = DataLoader(TensorDataset(x, y), batch_size=16)\n"
    "net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),\n"
    "                          torch.nn.Linear(64, 2))\n"
    "optimizer = torch.optim.SGD(net.parameters(), lr=0.05)\n"
    f"history = fit(net, loader, loader, optimizer, {EPOCHS},\n"
    f"              live=LivePlot(epochs={EPOCHS}))\n"
    "print('fit finished:', len(history), 'epochs')",
]


def _write_scratch(folder):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nbformat.write(nb, folder / SCRATCH)


def _observed(name, facts):
    """Keep what a widget test changed and saw, for the CI artifacts."""
    (SHOTS / f"widget_{name}.json").write_text(
        json.dumps(facts, indent=1), encoding="utf-8")


def _wait_for(predicate, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def widgets_page(new_tab, lab, shots):
    """The scratch notebook, opened and run through the UI (once)."""
    _write_scratch(lab.folder)
    with new_tab() as notebook:
        start = time.monotonic()
        notebook.open(SCRATCH)
        notebook.watch()
        notebook.run_all()
        (shots / "widgets.json").write_text(json.dumps({
            "notebook": SCRATCH,
            "run_all_s": round(time.monotonic() - start, 1)}),
            encoding="utf-8")
        assert notebook.error_texts() == []
        prompts = notebook.prompts()
        assert all(p[1:-2].isdigit() for p in prompts), prompts
        yield notebook
        notebook.screenshot(shots / "widgets.png")


def test_training_explorer_plan_follows_controls_and_run_trains(
        widgets_page):
    """Another strategy or rate changes the plan; Run trains and draws."""
    cell = widgets_page.code_cell(0)
    plan = cell.locator(".widget-html-content").filter(
        has_text="Will train").first
    plan.wait_for(state="visible")
    assert "only the new head" in plan.inner_text()
    # The last strategy trains every layer, whatever its label.
    strategies = cell.locator(".widget-toggle-buttons button")
    chosen = strategies.last.inner_text().strip()
    strategies.last.click()
    _wait_for(lambda: "every layer" in plan.inner_text(),
              "the plan to say 'every layer'")
    before_lr = plan.inner_text()
    lr_handle = cell.locator(".widget-slider, .widget-hslider").filter(
        has_text="learning rate").locator(".noUi-handle").first
    lr_handle.focus()
    lr_handle.press("ArrowLeft")
    _wait_for(lambda: plan.inner_text() != before_lr,
              "the plan to show the new learning rate")
    assert "every layer" in plan.inner_text()

    page = widgets_page.page
    clicked = page.evaluate("() => performance.now()")
    cell.get_by_role("button", name="Run").click()
    status = cell.locator(".widget-html-content").filter(
        has_text="done").first
    status.wait_for(state="visible", timeout=300_000)
    assert "validation accuracy" in status.inner_text()

    def figures_drawn():
        return len({im["src"] for im in widgets_page.seen("img")
                    if im["cell"] == 0 and im["t"] > clicked
                    and im["src"].startswith("data:image/png")})

    try:  # the last epoch's figure may reach the page after "done"
        _wait_for(lambda: figures_drawn() >= 2, "two figures", timeout=10)
    except AssertionError:
        pass  # reported below, with the count
    distinct = figures_drawn()
    _observed("training_explorer", {
        "changed": f"strategy -> {chosen}, learning rate one step "
                   "down, Run pressed (2 epochs)",
        "plan": plan.inner_text(), "status": status.inner_text(),
        "figures_drawn_during_run": distinct})
    assert distinct >= 2, (
        f"{distinct} figure(s) drawn during the 2-epoch run: the live "
        "plot under the explorer did not follow every epoch")
    assert widgets_page.error_texts() == []


def test_live_plot_updates_during_fit_and_stays_in_saved_notebook(
        widgets_page, lab):
    """The figure is redrawn while fit runs; the saved file keeps the last."""
    during = [im for im in widgets_page.seen("img")
              if im["cell"] == 1 and im["running"]
              and im["src"].startswith("data:image/png")]
    distinct = list(dict.fromkeys(im["src"] for im in during))
    assert len(distinct) >= 2, (
        f"{len(distinct)} distinct figures drawn while fit ran "
        f"(expected one per epoch, {EPOCHS})")
    cell = widgets_page.code_cell(1)
    assert "fit finished: 3 epochs" in cell.inner_text()
    shown = cell.locator(".jp-OutputArea-output img")
    assert shown.count() == 1, f"{shown.count()} figures under the cell"
    final_src = shown.first.get_attribute("src")

    _observed("live_plot", {
        "changed": f"fit for {EPOCHS} epochs with live=LivePlot()",
        "figures_drawn_while_running": len(distinct),
        "figures_under_cell_after": shown.count()})
    widgets_page.save()
    nb = json.loads((lab.folder / SCRATCH).read_text(encoding="utf-8"))
    saved = [out["data"]["image/png"] for out in nb["cells"][1]["outputs"]
             if "image/png" in out.get("data", {})]
    assert len(saved) == 1, "the saved notebook lost the live figure"
    png = "".join(saved[0]) if isinstance(saved[0], list) else saved[0]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert final_src.endswith(png.strip()), \
        "the saved figure is not the last one shown"
