"""Tests of tlhelpers.runner through `tlcourse run`: real kernels, tiny
notebooks (each kernel start takes a second or two)."""

import json
import subprocess
import sys
import time
import types

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from tlhelpers import cli, runner


def write_nb(path, *sources):
    """Write a notebook whose cells are `sources` (str: code, ("md", s))."""
    cells = [new_markdown_cell(s[1]) if isinstance(s, tuple)
             else new_code_cell(s) for s in sources]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=cells), path)
    return path


def outputs_text(path):
    """Return every text output of an executed notebook, joined."""
    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
            parts.append(out.get("evalue", ""))
    return "\n".join(parts)


@pytest.fixture
def course(tmp_path):
    """A course folder: 01 passes, 02 fails at cell 2, 03 would pass."""
    nbs = tmp_path / "course" / "notebooks"
    write_nb(nbs / "01_ok.ipynb",
             ("md", "# A passing notebook"),
             "import os, sys\n"
             "from tlhelpers import config\n"
             "print('smoke', config.smoke_mode())\n"
             "print('python', sys.executable)",
             "x = 40 + 2\nx",
             "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()")
    write_nb(nbs / "02_bad.ipynb",
             "y = 1",
             "raise ValueError('the answer is not 41')\n# more",
             "print('never reached')")
    write_nb(nbs / "03_after.ipynb", "print('ran after the failure')")
    return tmp_path / "course"


def test_run_stops_at_failing_cell_and_names_notebook_and_cell(
        course, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(course)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as CI sets it
    out = tmp_path / "build"
    code = cli.main(["run", "--smoke", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()

    assert code == 1
    err = captured.err
    assert "02_bad.ipynb" in err
    assert "cell 2 of 3" in err
    assert "raise ValueError('the answer is not 41')" in err
    assert "ValueError: the answer is not 41" in err
    assert "01_ok.ipynb" not in err  # the passing one is not blamed
    # stop on the first failure: 03 was not run, and says so
    assert "not run  03_after.ipynb" in captured.out
    assert not (out / "03_after.ipynb").exists()
    assert f"HTML build: {out / 'index.html'}" in captured.out
    assert captured.out.strip().endswith(
        "notebooks: 1 passed, 1 failed, 1 skipped")

    # executed notebooks, with outputs; the failing one up to its error
    ok_text = outputs_text(out / "01_ok.ipynb")
    assert "smoke True" in ok_text  # --smoke reached the kernel
    assert f"python {sys.executable}" in ok_text  # this Python's kernel
    assert "42" in ok_text
    ok_nb = nbformat.read(out / "01_ok.ipynb", as_version=4)
    assert "image/png" in ok_nb.cells[-1].outputs[0]["data"]  # inline plot
    bad_text = outputs_text(out / "02_bad.ipynb")
    assert "the answer is not 41" in bad_text
    assert "never reached" not in bad_text
    assert (out / "01_ok.html").stat().st_size > 1000
    assert (out / "02_bad.html").exists()

    index = (out / "index.html").read_text()
    assert 'href="01_ok.html"' in index and 'href="02_bad.html"' in index
    for word in ("passed", "failed", "not run", "peak memory", "SMOKE"):
        assert word in index
    assert "cell 2 of 3" in index
    assert " MiB" in index and " s</td>" in index

    build = json.loads((out / "build.json").read_text())
    rows = {r["name"]: r for r in build["notebooks"]}
    assert [r["status"] for r in build["notebooks"]] == [
        "passed", "failed", "not run"]
    assert rows["02_bad.ipynb"]["cell"] == 2
    for name in ("01_ok.ipynb", "02_bad.ipynb"):
        assert rows[name]["seconds"] > 0
        # a Python kernel holds tens of MiB at least
        assert 20 < rows[name]["peak_mem_mb"] < 4000
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files


def test_keep_going_runs_the_notebooks_after_a_failure(
        course, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TLH_SMOKE", raising=False)
    out = tmp_path / "build"
    nbs = course / "notebooks"
    code = cli.main(["run", "--keep-going", "--no-progress", "--out",
                     str(out), str(nbs / "02_bad.ipynb"),
                     str(nbs / "03_after.ipynb")])
    captured = capsys.readouterr()

    assert code == 1
    assert "FAILED 02_bad.ipynb, cell 2 of 3" in captured.err
    assert "ran after the failure" in outputs_text(out / "03_after.ipynb")
    assert "mode: full" in captured.out
    last = captured.out.strip().splitlines()[-1]
    assert last == "notebooks: 1 passed, 1 failed, 0 skipped"


def test_passing_run_exits_zero_and_reports_full_mode(
        course, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TLH_SMOKE", raising=False)
    out = tmp_path / "build"
    code = cli.main(["run", "--no-progress", "--out", str(out),
                     str(course / "notebooks" / "01_ok.ipynb")])
    assert code == 0
    assert "smoke False" in outputs_text(out / "01_ok.ipynb")
    out_text = capsys.readouterr().out
    assert "mode: full" in out_text
    assert "notebooks: 1 passed, 0 failed, 0 skipped" in out_text


def test_peak_memory_sees_what_the_kernel_allocated(tmp_path):
    nb = write_nb(tmp_path / "01_big.ipynb",
                  "block = bytearray(b'x') * (150 * 2**20)\n"
                  "del block")
    result = runner.execute_notebook(nb, tmp_path / "out")
    assert result.status == "passed"
    # 150 MiB written, then freed: only a peak measurement sees it
    assert result.peak_mem_mb > 150


def test_peak_memory_tracks_a_child_process():
    code = ("import time; b = bytearray(b'x') * (120 * 2**20); "
            "time.sleep(1.0)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    with runner.PeakMemory(proc.pid, interval=0.02) as memory:
        proc.wait()
    assert memory.peak_bytes > 120 * 2**20


def test_tree_rss_counts_children_and_says_none_when_gone():
    child = ("import time; b = bytearray(b'x') * (100 * 2**20); "
             "time.sleep(30)")
    parent = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 20
        while (runner.tree_rss(proc.pid) or 0) < 100 * 2**20:
            assert time.monotonic() < deadline, "the child never showed up"
            time.sleep(0.05)
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
    assert runner.tree_rss(proc.pid) is None


def test_a_cell_asking_for_input_fails_instead_of_waiting(tmp_path):
    nb = write_nb(tmp_path / "01_ask.ipynb", "name = input('name? ')")
    start = time.perf_counter()
    result = runner.execute_notebook(nb, tmp_path / "out", timeout=60)
    assert time.perf_counter() - start < 30
    assert result.status == "failed"
    assert result.error.cell == 1
    assert "input" in result.error.first_line


def test_timeout_names_the_slow_cell_and_the_option(tmp_path, capsys):
    nb = write_nb(tmp_path / "01_slow.ipynb",
                  "x = 1", "import time\ntime.sleep(60)")
    start = time.perf_counter()
    code = cli.main(["run", "--no-progress", "--timeout", "1",
                     "--out", str(tmp_path / "out"), str(nb)])
    assert time.perf_counter() - start < 40
    assert code == 1
    err = capsys.readouterr().err
    assert "01_slow.ipynb, cell 2 of 2 (import time)" in err
    assert "--timeout" in err


def test_a_notebooks_time_limit_covers_all_its_cells(tmp_path):
    """Two cells of 3 s each under a 5 s limit: the second one stops."""
    nb = write_nb(tmp_path / "01_two.ipynb", "import time\ntime.sleep(3)",
                  "time.sleep(3)")
    result = runner.execute_notebook(nb, tmp_path / "out", timeout=5)
    assert result.status == "failed"
    assert result.error.cell == 2 and result.error.ename == "Timeout"


def test_no_time_limit_with_timeout_0(tmp_path):
    nb = write_nb(tmp_path / "01_ok.ipynb", "x = 1")
    assert runner.execute_notebook(nb, tmp_path / "o", timeout=0).status \
        == "passed"
    with pytest.raises(ValueError, match="0: no limit"):
        runner.execute_notebook(nb, tmp_path / "o", timeout=-1)


def test_solutions_are_filled_in_and_run_in_strict_mode(
        tmp_path, monkeypatch, capsys):
    nb = write_nb(tmp_path / "01_exercise.ipynb",
                  "import os\nanswer = ...\n"
                  "assert answer == 42, 'not attempted'\n"
                  "print('strict', os.environ.get('TLH_STRICT'))")
    calls = []

    def fill_solutions(nb_path, out_path):
        calls.append(nb_path)
        text = open(nb_path, encoding="utf-8").read()
        with open(out_path, "w", encoding="utf-8") as f:
            f.write(text.replace("answer = ...", "answer = 42"))

    fake = types.ModuleType("tlhelpers.exercises")
    fake.fill_solutions = fill_solutions
    monkeypatch.setitem(sys.modules, "tlhelpers.exercises", fake)
    out = tmp_path / "out"

    code = cli.main(["run", "--solutions", "--no-progress", "--out",
                     str(out), str(nb)])
    assert code == 0, capsys.readouterr().err
    assert len(calls) == 1
    assert "strict 1" in outputs_text(out / "01_exercise.ipynb")
    # the learner's notebook itself is untouched
    assert "answer = ..." in nb.read_text()


def test_solutions_without_a_filler_is_a_clear_usage_error(
        tmp_path, monkeypatch, capsys):
    nb = write_nb(tmp_path / "01_x.ipynb", "x = 1")
    monkeypatch.setitem(sys.modules, "tlhelpers.exercises",
                        types.ModuleType("tlhelpers.exercises"))
    code = cli.main(["run", "--solutions", "--out", str(tmp_path / "o"),
                     str(nb)])
    assert code == 2
    assert "fill_solutions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_missing_notebook_is_named(tmp_path, capsys):
    code = cli.main(["run", "--out", str(tmp_path / "o"),
                     str(tmp_path / "07_nope.ipynb")])
    assert code == 2
    assert "07_nope.ipynb" in capsys.readouterr().err


def test_no_course_folder_says_where_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "find_course_dir", lambda start=None: None)
    assert cli.main(["run"]) == 2
    assert "course folder" in capsys.readouterr().err


def test_course_notebooks_are_the_numbered_ones_in_order(tmp_path):
    nbs = tmp_path / "notebooks"
    for name in ("02_b.ipynb", "10_j.ipynb", "01_a.ipynb", "scratch.ipynb",
                 "1_short.ipynb", "03_c-copy.ipynb"):
        write_nb(nbs / name, "x = 1")
    write_nb(nbs / ".ipynb_checkpoints" / "01_a-checkpoint.ipynb", "x = 1")
    found = [p.name for p in runner.course_notebooks(tmp_path)]
    assert found == ["01_a.ipynb", "02_b.ipynb", "10_j.ipynb"]


def test_course_folder_is_found_from_a_subfolder(tmp_path):
    write_nb(tmp_path / "notebooks" / "01_a.ipynb", "x = 1")
    deep = tmp_path / "notebooks" / "data" / "more"
    deep.mkdir(parents=True)
    assert runner.find_course_dir(deep) == tmp_path.resolve()


def test_default_build_folder_is_build_in_the_course_folder(
        course, monkeypatch, capsys):
    seen = {}

    def fake_run_course(notebooks, out_dir, **kw):
        seen.update(notebooks=notebooks, out_dir=out_dir)
        raise ValueError("stop here")

    monkeypatch.chdir(course / "notebooks")
    monkeypatch.setattr(runner, "run_course", fake_run_course)
    assert cli.main(["run"]) == 2
    assert seen["out_dir"] == course.resolve() / "_build"
    assert [p.name for p in seen["notebooks"]] == [
        "01_ok.ipynb", "02_bad.ipynb", "03_after.ipynb"]


def test_two_notebooks_with_one_name_are_refused(tmp_path):
    a = write_nb(tmp_path / "a" / "01_x.ipynb", "x = 1")
    b = write_nb(tmp_path / "b" / "01_x.ipynb", "x = 1")
    with pytest.raises(ValueError, match="01_x.ipynb"):
        runner.run_course([a, b], tmp_path / "out", progress=False)


def test_cell_error_reads_like_a_sentence():
    err = runner.CellError(cell=3, cells=9, first_line="model.fit()",
                           ename="RuntimeError", evalue="out of memory")
    assert str(err) == ("cell 3 of 9 (model.fit()): "
                        "RuntimeError: out of memory")
    early = runner.CellError(cell=None, cells=9, first_line="",
                             ename="RuntimeError", evalue="no kernel")
    assert str(early).startswith("before the first cell")


def test_a_failed_html_export_is_a_warning_not_a_failed_run(
        tmp_path, monkeypatch, capsys):
    def no_templates(nb, path):
        raise ValueError("No template sub-directory with name 'lab' found "
                         "in the following paths:\n\t/somewhere")

    monkeypatch.setattr(runner, "export_html", no_templates)
    nb = write_nb(tmp_path / "01_ok.ipynb", "x = 1")
    out = tmp_path / "out"
    code = cli.main(["run", "--no-progress", "--out", str(out), str(nb)])
    err = capsys.readouterr().err
    assert code == 0  # the notebook ran; only its page is missing
    assert (out / "01_ok.ipynb").exists()
    assert "no HTML page for 1 notebook(s)" in err
    assert "pip install --force-reinstall --no-deps nbconvert" in err
    assert "no HTML page" in (out / "index.html").read_text()


def test_a_dying_kernel_is_named_with_the_likely_cause(tmp_path):
    nb = write_nb(tmp_path / "01_die.ipynb",
                  "x = 1", "import os\nos._exit(1)  # as the OOM killer",
                  "y = 2")
    result = runner.execute_notebook(nb, tmp_path / "out")
    assert result.status == "failed"
    assert result.error.cell == 2
    assert result.error.ename == "KernelDied"
    assert "out of memory" in result.error.evalue
