"""Tests of tlhelpers.runner through `tlcourse run`: real kernels, tiny
notebooks (each kernel start takes a second or two, so the tests that
start one are marked slow, and the course builds are shared)."""

import contextlib
import io
import json
import sys
import time
import types

import nbformat
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


def make_course(root):
    """A course folder: 01 passes, 02 fails at cell 2, 03 would pass."""
    nbs = root / "course" / "notebooks"
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
    write_nb(nbs / "03_after.ipynb",
             "from tlhelpers import config\n"
             "print('ran after the failure, smoke', config.smoke_mode())")
    return root / "course"


@pytest.fixture
def course(tmp_path):
    """A course folder of three notebooks (see make_course)."""
    return make_course(tmp_path)


def tlcourse(argv, cwd=None, **environ):
    """Run `tlcourse ARGV`; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        if cwd is not None:
            mp.chdir(cwd)
        for key, value in environ.items():
            if value is None:
                mp.delenv(key, raising=False)
            else:
                mp.setenv(key, value)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Return build(name): one of the course builds below, run once.

    "stopped": `tlcourse run --smoke --jobs 1` in the course folder,
    which stops at 02's failing cell. "kept_going": `--keep-going` in full mode over
    02 and 03. Each is (build folder, exit code, stdout, stderr), run
    when a test first asks for it (a test worker runs only its own).
    """
    root = tmp_path_factory.mktemp("runner")
    course = make_course(root)
    nbs = course / "notebooks"
    argv = {
        # One at a time: with --jobs 2 a notebook listed after the
        # failing one may start before the failure is known (tested
        # below, test_jobs_run_notebooks_side_by_side...).
        "stopped": (["run", "--smoke", "--no-progress", "--jobs", "1"],
                    {"cwd": course, "MPLBACKEND": "Agg"}),  # as CI sets it
        "kept_going": (["run", "--keep-going", "--no-progress",
                        str(nbs / "02_bad.ipynb"),
                        str(nbs / "03_after.ipynb")], {"TLH_SMOKE": None}),
    }
    done = {}

    def build(name):
        if name not in done:
            words, environ = argv[name]
            out = root / name
            done[name] = (out, *tlcourse(words + ["--out", str(out)],
                                         **environ))
        return done[name]

    return build


@pytest.mark.slow
def test_run_stops_at_failing_cell_and_names_notebook_and_cell(builds):
    out, code, stdout, err = builds("stopped")

    assert code == 1
    assert "02_bad.ipynb" in err
    assert "cell 2 of 3" in err
    assert "raise ValueError('the answer is not 41')" in err
    assert "ValueError: the answer is not 41" in err
    assert "01_ok.ipynb" not in err  # the passing one is not blamed
    # stop on the first failure: 03 was not run, and says so
    assert "not run  03_after.ipynb" in stdout
    assert not (out / "03_after.ipynb").exists()
    assert f"HTML build: {out / 'index.html'}" in stdout
    assert stdout.strip().endswith(
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


@pytest.mark.slow
def test_keep_going_runs_the_notebooks_after_a_failure_in_full_mode(
        builds):
    out, code, stdout, err = builds("kept_going")
    assert code == 1
    assert "FAILED 02_bad.ipynb, cell 2 of 3" in err
    assert "ran after the failure, smoke False" in outputs_text(
        out / "03_after.ipynb")
    assert "mode: full" in stdout
    last = stdout.strip().splitlines()[-1]
    assert last == "notebooks: 1 passed, 1 failed, 0 skipped"


@pytest.mark.slow
def test_peak_memory_sees_what_the_kernel_allocated(tmp_path):
    nb = write_nb(tmp_path / "01_big.ipynb",
                  "block = bytearray(b'x') * (150 * 2**20)\n"
                  "del block")
    result = runner.execute_notebook(nb, tmp_path / "out")
    assert result.status == "passed"
    # 150 MiB written, then freed: only a peak measurement sees it
    assert result.peak_mem_mb > 150


@pytest.mark.slow
def test_a_cell_asking_for_input_fails_instead_of_waiting(tmp_path):
    nb = write_nb(tmp_path / "01_ask.ipynb", "name = input('name? ')")
    start = time.perf_counter()
    result = runner.execute_notebook(nb, tmp_path / "out", timeout=60)
    assert time.perf_counter() - start < 30
    assert result.status == "failed"
    assert result.error.cell == 1
    assert "input" in result.error.first_line


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_notebooks_time_limit_covers_all_its_cells(tmp_path):
    """Two cells of 3 s each under a 5 s limit: the second one stops."""
    nb = write_nb(tmp_path / "01_two.ipynb", "import time\ntime.sleep(3)",
                  "time.sleep(3)")
    result = runner.execute_notebook(nb, tmp_path / "out", timeout=5)
    assert result.status == "failed"
    assert result.error.cell == 2 and result.error.ename == "Timeout"


@pytest.mark.slow
def test_no_time_limit_with_timeout_0(tmp_path):
    nb = write_nb(tmp_path / "01_ok.ipynb", "x = 1")
    assert runner.execute_notebook(nb, tmp_path / "o", timeout=0).status \
        == "passed"
    with pytest.raises(ValueError, match="0: no limit"):
        runner.execute_notebook(nb, tmp_path / "o", timeout=-1)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_dying_kernel_is_named_with_the_likely_cause(tmp_path):
    nb = write_nb(tmp_path / "01_die.ipynb",
                  "x = 1", "import os\nos._exit(1)  # as the OOM killer",
                  "y = 2")
    result = runner.execute_notebook(nb, tmp_path / "out")
    assert result.status == "failed"
    assert result.error.cell == 2
    assert result.error.ename == "KernelDied"
    assert "out of memory" in result.error.evalue


@pytest.mark.slow
def test_jobs_run_notebooks_side_by_side_and_stop_starting_after_a_failure(
        tmp_path, monkeypatch):
    """01 can only finish if 02 runs at the same time, and it finishes
    after 02's result is written; 02 fails, so 03, which would start
    next, is not run. Each kernel gets its share of the cores."""
    from tlhelpers import kernels

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    mark = tmp_path / "02_started"
    out = tmp_path / "out"
    nbs = tmp_path / "nbs"
    write_nb(nbs / "01_waits.ipynb",
             "import os, pathlib, time\n"
             f"mark = pathlib.Path({str(mark)!r})\n"
             f"page = pathlib.Path({str(out / '02_fails.html')!r})\n"
             f"nb = pathlib.Path({str(out / '02_fails.ipynb')!r})\n"
             "def finished():  # its page, last; or its notebook, long ago\n"
             "    return page.exists() or (\n"
             "        nb.exists() and time.time() - nb.stat().st_mtime > 15)\n"
             "deadline = time.monotonic() + 120\n"
             "while not (mark.exists() and finished()) \\\n"
             "        and time.monotonic() < deadline:\n"
             "    time.sleep(0.1)\n"
             "assert mark.exists(), '02 did not run beside 01'\n"
             "time.sleep(2)  # 02's run returns once its page is written\n"
             "print('threads', os.environ['OMP_NUM_THREADS'])")
    write_nb(nbs / "02_fails.ipynb",
             "import pathlib\n"
             f"pathlib.Path({str(mark)!r}).touch()\n"
             "raise ValueError('02 fails')")
    write_nb(nbs / "03_next.ipynb", "print('started after a failure')")
    build = runner.run_course(sorted(nbs.glob("*.ipynb")), out,
                              progress=False, jobs=2)
    assert [r.status for r in build.results] == [
        "passed", "failed", "not run"]
    assert f"threads {kernels.jobs_threads(2)}" in outputs_text(
        out / "01_waits.ipynb")


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True, "2"])
def test_jobs_must_be_a_whole_number_of_one_or_more(tmp_path, jobs):
    nb = write_nb(tmp_path / "01_x.ipynb", "x = 1")
    with pytest.raises(ValueError, match="jobs must be a whole number"):
        runner.run_course([nb], tmp_path / "out", progress=False,
                          jobs=jobs)


def test_run_jobs_option_rejects_what_is_not_a_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["run", "--jobs", "0", str(tmp_path / "01_x.ipynb")])
    assert stop.value.code == 2
    assert "give a whole number, 1 or more" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_notebooks_running_side_by_side(tmp_path, monkeypatch):
    """Ctrl-C reaches only the main thread: the kernels it waits on in
    other threads are killed, not left to run to their end."""
    import os
    import signal
    import threading

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    nbs = tmp_path / "nbs"
    for name in ("01_long", "02_long"):
        write_nb(nbs / f"{name}.ipynb",
                 "import pathlib, time\n"
                 f"pathlib.Path({str(tmp_path / name)!r} + '.started')"
                 ".touch()\n"
                 "time.sleep(120)\n"
                 f"pathlib.Path({str(tmp_path / name)!r} + '.finished')"
                 ".touch()")
    started = [tmp_path / "01_long.started", tmp_path / "02_long.started"]

    def press_ctrl_c():
        deadline = time.monotonic() + 90
        while not all(p.exists() for p in started) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        runner.run_course(sorted(nbs.glob("*.ipynb")), tmp_path / "out",
                          progress=False, jobs=2)
    assert all(p.exists() for p in started), "both notebooks ran"
    assert not list(tmp_path.glob("*.finished")), \
        "a notebook ran to its end after Ctrl-C"
