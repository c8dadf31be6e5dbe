"""Tests that keep the course notebooks clean, consistent and runnable.

The two nbval passes run the notebooks end to end in SMOKE mode: once as
shipped (exercise checks report "not attempted") and once with every
reference solution filled in and strict checks (every check must pass).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
README = (ROOT / "README.md").read_text(encoding="utf-8")
NAME = re.compile(r"^\d\d_[a-z0-9]+(_[a-z0-9]+)*\.ipynb$")


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _sources(nb, kind=None):
    return ["".join(c["source"]) for c in nb["cells"]
            if kind is None or c["cell_type"] == kind]


def test_the_course_has_its_notebooks():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:1] == ["00_welcome"] and len(names) >= 8, names
    numbers = [int(n[:2]) for n in names]
    assert numbers == list(range(len(numbers))), "numbering has a gap"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"cell {i} has outputs"
            assert cell.get("execution_count") is None, f"cell {i} ran"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_course_skeleton(path):
    """Title, learn, Setup, Configuration, Summary, Exercises, CPU time."""
    assert NAME.match(path.name)
    nb = _load(path)
    md = _sources(nb, "markdown")
    code = _sources(nb, "code")
    assert md[0].startswith("# "), "first cell must be the title"
    headings = [ln.strip() for text in md for ln in text.splitlines()
                if ln.startswith("## ")]
    for needed in ("## Setup", "## Configuration", "## Summary",
                   "## Exercises", "## Further reading"):
        assert needed in headings, f"missing {needed!r} in {headings}"
    order = [headings.index(h) for h in ("## Setup", "## Configuration",
                                         "## Summary", "## Exercises")]
    assert order == sorted(order), "sections out of order"
    assert len(code) <= 25, f"{len(code)} code cells (at most 25)"
    assert re.search(r"minutes? on a CPU", md[0] + md[1]), \
        "state the expected CPU time near the top"
    setup = [c for c in code if "setup(" in c]
    assert len(setup) == 1, "exactly one Setup cell calling setup()"
    assert not any("import *" in c for c in code)
    assert all(len(ln) <= 79 for c in code for ln in c.splitlines()), \
        "code lines longer than 79 characters"


def test_readme_index_lists_every_notebook_in_order():
    linked = re.findall(r"\(notebooks/(\d\d_[a-z0-9_]+)\.ipynb\)", README)
    index = list(dict.fromkeys(linked))
    assert index == [p.stem for p in NOTEBOOKS]


def test_readme_exercise_list_matches_the_notebooks():
    """Every exercise cell in a notebook is listed in the README, and back."""
    tagged = []
    for path in NOTEBOOKS:
        for cell in _load(path)["cells"]:
            for tag in cell.get("metadata", {}).get("tags", []):
                if tag.startswith("exercise:"):
                    tagged.append(tag.split(":", 1)[1])
    listed = re.findall(r"`exercises\.([a-z_]+)`", README)
    assert sorted(set(tagged)) == sorted(set(listed))
    assert len(tagged) == len(set(tagged)), "an exercise appears twice"


def _nbval(folder, env_extra, timeout):
    # The two passes run side by side on two cores: one thread per kernel
    # avoids oversubscription, which slows torch down many times over.
    env = dict(os.environ, TLH_SMOKE="1", OMP_NUM_THREADS="1",
               TLH_PROGRESS="0", **env_extra)
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-q",
           "-p", "no:cacheprovider", "-p", "no:xdist",
           "--nbval-cell-timeout", "300", str(folder)]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)
    tail = "\n".join(proc.stdout.splitlines()[-60:])
    assert proc.returncode == 0, tail + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail


@pytest.mark.slow
@pytest.mark.notebooks
def test_notebooks_run_as_shipped(tmp_path):
    """Every notebook runs top to bottom with the learner's placeholders."""
    for path in NOTEBOOKS:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _nbval(tmp_path, {"TLH_STRICT": "0"}, timeout=1200)


@pytest.mark.slow
@pytest.mark.notebooks
def test_notebooks_pass_every_check_with_reference_solutions(tmp_path):
    """With the solutions filled in, every exercise check passes (strict)."""
    from tlhelpers.exercises import fill_solutions

    for path in NOTEBOOKS:
        fill_solutions(path, tmp_path / path.name)
    _nbval(tmp_path, {"TLH_STRICT": "1"}, timeout=1200)
