"""The benchmark scripts' own logic: arguments and how rows read."""

import importlib.util
from pathlib import Path

import pytest

from tlhelpers.kernels import CellError
from tlhelpers.runner import NotebookResult

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_notebooks():
    return _script("bench_notebooks")


@pytest.mark.parametrize("argv, words", [
    (["--against", "HEAD", "--jobs", "2"], "drop --rev and --jobs"),
    (["--against", "HEAD", "--rev", "HEAD"], "drop --rev and --jobs"),
    (["--stop-at", "3"], "--stop-at X needs --against"),
    (["--against", "HEAD", "--stop-at", "1"], "X > 1"),
])
def test_bench_notebooks_refuses_arguments_that_do_not_go_together(
        bench_notebooks, argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_notebooks.main(argv)
    assert stop.value.code == 2
    assert words in capsys.readouterr().err


def _failed(ename, evalue, cell=3):
    return NotebookResult(
        name="03_fine_tuning.ipynb", source=Path("03_fine_tuning.ipynb"),
        status="failed", seconds=12.5,
        error=CellError(cell=cell, cells=30, first_line="import torch",
                        ename=ename, evalue=evalue))


def test_a_failed_row_says_which_cell_and_why(bench_notebooks):
    row = bench_notebooks.reason(_failed("KeyError", "'accuracy'\nmore"))
    assert row == ": cell 3: KeyError: 'accuracy'"
    long = bench_notebooks.reason(_failed("ValueError", "x" * 200))
    assert len(long) == 2 + 90 and long.endswith("...")
    passed = NotebookResult(name="a.ipynb", source=Path("a.ipynb"),
                            status="passed")
    assert bench_notebooks.reason(passed) == ""


def test_a_stopped_notebook_is_a_lower_bound_not_a_failure(bench_notebooks):
    import nbformat
    from nbclient.exceptions import CellTimeoutError

    from tlhelpers import kernels

    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import time; time.sleep(99)")])
    stopped = _failed("", "")
    stopped.error = kernels.cell_error(nb, 0, CellTimeoutError("late"))
    assert bench_notebooks.timed_out(stopped)
    assert bench_notebooks.seconds(stopped) == ">=12.5"
    broken = _failed("KeyError", "'accuracy'")
    assert not bench_notebooks.timed_out(broken)
    assert bench_notebooks.seconds(broken) == "12.5"
