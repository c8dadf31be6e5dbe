"""Every course notebook, run in JupyterLab in a real browser.

What a learner does: open the notebook, Run > Run All Cells, wait, save.
The run must end with every code cell executed and no error output, in
the page and in the saved file. A notebook that calls a slow function
(fit, lr_find, extract_features, compare_strategies) without
progress=False must show a progress bar while one of its cells runs.
Each widget a notebook shows is then changed and must react: a
feature-map browser's slider redraws it, a training explorer's plan
follows its strategy, and a live plot's figure stays in the saved file.
A screenshot of each notebook goes to _build/ui/, with the run's
duration, the progress bars seen and what the widgets did in
NN_name.json beside it.
"""

import json
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

pytestmark = [pytest.mark.ui, pytest.mark.slow]


def _saved_problems(path):
    """Code cells of a saved notebook that did not run, or raised."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for i, cell in enumerate(nb["cells"], start=1):
        if cell["cell_type"] != "code":
            continue
        if cell.get("execution_count") is None:
            problems.append(f"cell {i} did not run")
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                problems.append(f"cell {i}: {out['ename']}: {out['evalue']}")
    return problems


def _code_cells_using(path, *names):
    """Indexes (among code cells) of the cells that call one of `names`."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code"]
    return [i for i, src in enumerate(code)
            if any(f"{name}(" in src for name in names)]


# A call of a function that shows a bar (a bare call: notebooks import by
# name), in a cell that does not turn the bar off.
SLOW_CALL = re.compile(
    r"(?<![\w.])(fit|lr_find|extract_features|compare_strategies)\(")


def _shows_progress(path):
    """Whether some code cell calls a slow function with its bar on."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    return any(SLOW_CALL.search(src) and "progress=False" not in src
               for src in ("".join(c["source"]) for c in nb["cells"]
                           if c["cell_type"] == "code"))


def _until(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _image(cell):
    imgs = cell.locator(".jp-OutputArea-output img")
    return imgs.last.get_attribute("src") if imgs.count() else None


def _move_stage_slider(cell):
    """A feature-map browser: press End on its slider; the drawing and
    the stage shown must change."""
    slider = cell.locator(".widget-slider, .widget-hslider").filter(
        has_text="stage").first
    slider.wait_for(state="visible")
    readout = slider.locator(".widget-readout")
    before, drawing = readout.inner_text().strip(), _image(cell)
    assert drawing, "the browser shows no drawing"
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    handle.press("End")
    after = _until(lambda: (t := readout.inner_text().strip()) != before
                   and t, "the stage slider to move")
    _until(lambda: _image(cell) not in (None, drawing),
           "the drawing of the new stage")
    return f"stage slider {before} -> {after}: drawing changed"


def _change_strategy(cell):
    """A training explorer: pick another strategy; the plan must follow."""
    plan = cell.locator(".widget-html-content").filter(
        has_text="Will train").first
    plan.wait_for(state="visible")
    before = plan.inner_text()
    # The last strategy trains every layer, whatever its label.
    strategies = cell.locator(".widget-toggle-buttons button")
    chosen = strategies.last.inner_text().strip()
    strategies.last.click()
    _until(lambda: "every layer" in plan.inner_text(),
           "the plan to say 'every layer'")
    return f"strategy -> {chosen}: plan {before!r} -> " \
           f"{plan.inner_text()!r}"


def _live_plot_kept(path, index):
    """A live plot: the saved cell keeps its (final) figure."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    kept = [o for o in code[index].get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert kept, f"code cell {index + 1}: the live plot's figure was lost"
    return f"code cell {index + 1}: live figure kept in the saved file"


def _exercise_widgets(notebook, path, saved):
    """Change each widget the notebook shows; return what was seen."""
    seen = []
    for i in _code_cells_using(path, "FeatureMapBrowser",
                               "feature_map_browser"):
        seen.append(_move_stage_slider(notebook.code_cell(i)))
    for i in _code_cells_using(path, "TrainingExplorer",
                               "training_explorer"):
        seen.append(_change_strategy(notebook.code_cell(i)))
    for i in _code_cells_using(path, "LivePlot"):
        seen.append(_live_plot_kept(saved, i))
    return seen


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_jupyterlab(path, notebook, lab, shots):
    """Run All Cells ends with every cell run and no error output, a
    progress bar shows where the learner waits, and every widget shown
    reacts to a change."""
    saved = lab.folder / path.name
    facts = {"notebook": path.name}
    start = time.monotonic()
    try:
        notebook.open(path.name)
        facts["open_s"] = round(time.monotonic() - start, 1)
        notebook.watch()
        notebook.run_all()
        facts["run_all_s"] = round(time.monotonic() - start
                                   - facts["open_s"], 1)
        notebook.save()
        prompts = notebook.prompts()
        assert prompts and all(p[1:-2].isdigit() for p in prompts), \
            f"cells not run: {prompts}"
        assert "| Idle" in notebook.kernel_status(), \
            notebook.kernel_status()
        assert notebook.error_texts() == []
        assert _saved_problems(saved) == []
        bars = notebook.seen("progress")
        facts["progress_bars"] = {
            "shown": len(bars),
            "while_running": len([b for b in bars if b["running"]]),
            "code_cells": sorted({b["cell"] + 1 for b in bars})}
        if _shows_progress(path):
            assert facts["progress_bars"]["while_running"] >= 1, (
                "no progress bar appeared while a cell ran, though the "
                "notebook calls a slow function with its bar on")
        facts["widgets"] = _exercise_widgets(notebook, path, saved)
        assert notebook.error_texts() == []
    finally:
        facts["total_s"] = round(time.monotonic() - start, 1)
        notebook.screenshot(shots / f"{path.stem}.png")
        (shots / f"{path.stem}.json").write_text(
            json.dumps(facts, indent=1), encoding="utf-8")
