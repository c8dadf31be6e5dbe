"""tlhelpers.kernels: threads, OpenMP waiting and the allocator; memory,
limits and kills; running a notebook's cells and reporting their errors."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from tlhelpers import kernels, runner


def test_cgroup_cpus_reads_a_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert kernels.cgroup_cpus(tmp_path) == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert kernels.cgroup_cpus(tmp_path) is None


def test_usable_cores_follow_a_quota_below_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core
    assert kernels.usable_cores(tmp_path) == 1


def test_jobs_share_the_cores_and_fit_in_memory(monkeypatch):
    import types

    monkeypatch.setattr(kernels, "usable_cores", lambda: 4)
    assert [kernels.jobs_threads(j) for j in (1, 2, 3, 4, 8)] == [
        4, 2, 1, 1, 1]
    free = {"available": 64 * 2**30}
    monkeypatch.setattr(kernels.psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(**free))
    assert kernels.default_jobs(2048) == 4          # one per core
    assert kernels.default_jobs(2048, limit=3) == 3
    free["available"] = 5 * 2**30                   # two 2 GB kernels fit
    assert kernels.default_jobs(2048) == 2
    free["available"] = 2**30                       # not even one: still 1
    assert kernels.default_jobs(2048) == 1


def test_thread_env_sets_every_library_and_passive_waiting():
    env = kernels.thread_env(3)
    assert {env[k] for k in kernels.THREAD_VARIABLES} == {"3"}
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in kernels.thread_env(3, wait_policy=None)
    with pytest.raises(ValueError, match=">= 1"):
        kernels.thread_env(0)


def test_runner_kernels_get_the_settings_but_a_value_set_wins():
    env = runner.kernel_env({"OMP_NUM_THREADS": "1"})
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["OMP_WAIT_POLICY"] == kernels.WAIT_POLICY
    assert env["MKL_NUM_THREADS"] == str(kernels.default_threads())


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc's mallopt")
def test_tune_allocator_applies_on_glibc():
    assert kernels.tune_allocator() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc's mallinfo2")
def test_heap_in_use_follows_a_block_and_its_free():
    import torch

    before = kernels.heap_in_use()
    block = torch.ones(8 * 2 ** 20 // 4)  # 8 MB: below the mmap threshold
    during = kernels.heap_in_use()
    del block
    after = kernels.heap_in_use()
    assert during - before >= 8 * 2 ** 20
    assert during - after >= 8 * 2 ** 20


@pytest.mark.slow
def test_a_course_kernel_reads_the_settings_back(tmp_path):
    """The settings reach the kernel process itself (read inside it)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import json, os, torch\n"
        "print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY'),\n"
        "    'malloc': os.environ.get('MALLOC_MMAP_THRESHOLD_'),\n"
        "    'threads': torch.get_num_threads()}))")]
    path = tmp_path / "01_probe.ipynb"
    nbformat.write(nb, path)
    build = runner.run_course([path], tmp_path / "out", progress=False,
                              timeout=300)
    assert build.ok
    done = nbformat.read(tmp_path / "out" / path.name, as_version=4)
    seen = json.loads(done.cells[0].outputs[0]["text"])
    malloc = (kernels.ALLOCATOR["MALLOC_MMAP_THRESHOLD_"]
              if kernels.ALLOCATOR_ON else None)
    assert seen == {"omp": kernels.WAIT_POLICY, "malloc": malloc,
                    "threads": kernels.default_threads()}


def test_shell_exports_only_what_is_not_set_yet():
    lines = kernels.shell_exports({"OMP_NUM_THREADS": "1"}, threads=3)
    assert "export OMP_WAIT_POLICY=PASSIVE" in lines.splitlines()
    assert "OMP_NUM_THREADS" not in lines
    assert "export MKL_NUM_THREADS=3" in lines.splitlines()


def test_binder_start_adds_passive_waiting_from_the_package(tmp_path):
    start = Path(__file__).resolve().parents[1] / "binder" / "start"
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "TLH_CGROUP_DIR": str(tmp_path)}
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    out = subprocess.run(
        ["bash", str(start), sys.executable, "-c",
         "import os; print(os.environ['OMP_WAIT_POLICY'],"
         " os.environ['OMP_NUM_THREADS'])"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["PASSIVE", "1"]


def test_grading_kernels_get_the_course_settings(tmp_path):
    from tlhelpers import grading

    env = grading._kernel_env(tmp_path, threads=1, sandbox=True)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["OMP_WAIT_POLICY"] == kernels.WAIT_POLICY
    assert env["TLH_PROGRESS"] == "0"


def test_installed_kernel_starts_with_the_course_settings(tmp_path):
    where = kernels.install_kernel_spec(user=False, prefix=str(tmp_path))
    spec = json.loads((tmp_path / "share" / "jupyter" / "kernels"
                       / kernels.KERNEL_NAME / "kernel.json").read_text())
    assert str(tmp_path) in where
    assert spec["display_name"] == kernels.KERNEL_DISPLAY_NAME
    assert spec["env"] == kernels.runtime_env()


def test_tlcourse_kernel_install_reports_where(tmp_path, capsys):
    from tlhelpers import cli

    assert cli.main(["kernel", "install", "--prefix", str(tmp_path)]) == 0
    assert "OMP_WAIT_POLICY=PASSIVE" in capsys.readouterr().out
    assert (tmp_path / "share" / "jupyter" / "kernels"
            / kernels.KERNEL_NAME / "kernel.json").exists()


def test_setup_applies_the_thread_count_in_process(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        info = kernels.apply_in_process()
        assert info["threads"] == kernels.default_threads()
        assert torch.get_num_threads() == kernels.default_threads()
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------ processes, memory


def _python(code):
    return subprocess.Popen([sys.executable, "-c", code])


def test_memory_sampler_tracks_a_child_process():
    code = ("import time; b = bytearray(b'x') * (120 * 2**20); "
            "time.sleep(1.0)")
    proc = _python(code)
    with kernels.MemorySampler(proc.pid, interval=0.02) as memory:
        proc.wait()
    assert memory.peak_bytes > 120 * 2**20


def test_memory_sampler_measures_the_growth_of_a_block():
    """In-process, without the high-water mark: the growth above the
    start, not the peak since the process began."""
    import mmap

    with kernels.MemorySampler(os.getpid(), interval=0.005,
                               children=False, high_water=False) as mem:
        # Fresh pages from the OS: a malloc'd block could reuse memory
        # the tuned allocator kept from an earlier test's free, and then
        # the resident set would not grow.
        block = mmap.mmap(-1, 80 * 2**20)
        block.write(b"x" * (80 * 2**20))
        time.sleep(0.1)   # held for a few samples
        block.close()
    assert 60 * 2**20 < mem.growth_bytes < 400 * 2**20
    assert mem.peak_bytes - mem.growth_bytes == mem.base_bytes


def test_tree_rss_counts_children_and_says_none_when_gone():
    child = ("import time; b = bytearray(b'x') * (100 * 2**20); "
             "time.sleep(30)")
    parent = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "time.sleep(30)")
    proc = _python(parent)
    try:
        deadline = time.monotonic() + 20
        while (kernels.tree_rss(proc.pid) or 0) < 100 * 2**20:
            assert time.monotonic() < deadline, "the child never showed up"
            time.sleep(0.05)
        own = kernels.tree_rss(proc.pid, children=False)
        assert own < 100 * 2**20   # the child's memory is the child's
    finally:
        kernels.kill_tree(proc.pid)
        proc.wait()
    assert kernels.tree_rss(proc.pid) is None


def _watch(code, limit_bytes, seconds=None):
    """Run `code` under a watchdog until it acts; return (reason, alive)."""
    proc = _python(code)
    watchdog = kernels.Watchdog(limit_bytes, grace=0, interval=0.05)
    watchdog.watch(proc.pid)
    watchdog.cell_started(seconds)
    watchdog.start()
    def alive():
        try:
            return psutil.Process(proc.pid).status() != "zombie"
        except psutil.Error:
            return False

    try:
        end = time.monotonic() + 30
        while watchdog.reason is None and time.monotonic() < end:
            time.sleep(0.05)
        # The reason is set first, then the kill (a loaded machine may
        # take a moment): give it 10 s, where the process sleeps 60.
        end = time.monotonic() + 10
        while alive() and time.monotonic() < end:
            time.sleep(0.05)
        still_alive = alive()
    finally:
        watchdog.stop()
        proc.kill()
        proc.wait()
    return watchdog.reason, still_alive


def test_watchdog_kills_a_kernel_past_its_memory():
    reason, alive = _watch(
        "import time\nx = bytearray(300 * 2**20)\ntime.sleep(60)",
        limit_bytes=100 * 2**20)
    assert reason == "memory" and not alive


def test_watchdog_kills_a_cell_that_ignores_its_interrupt():
    reason, alive = _watch("import time\ntime.sleep(60)",
                           limit_bytes=2**40, seconds=0)
    assert reason == "timeout" and not alive


def test_a_kill_spares_a_process_that_reused_the_pid():
    """Pids are checked against their start time before a kill."""
    proc = _python("import time; time.sleep(60)")
    try:
        started = kernels.start_time(proc.pid)
        assert started is not None
        kernels.kill_tree(proc.pid, started + 1.0)  # another process
        time.sleep(0.2)
        assert proc.poll() is None
        kernels.kill_tree(proc.pid, started)
        assert proc.wait(timeout=10) is not None
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/status").exists(),
                    reason="rlimits are enforced on Linux")
def test_memory_limit_turns_a_hog_into_a_memory_error():
    code = ("from tlhelpers.kernels import limit_memory\n"
            "limit_memory(300, 4096)\n"
            "try:\n    x = bytearray(2**30)\n"
            "except MemoryError:\n    print('MemoryError')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "MemoryError", out.stderr


# --------------------------------------------------------- running cells


@pytest.mark.parametrize("text, seconds", [("0", 0.0), ("2.5", 2.5)])
def test_seconds_argument_reads_a_time_limit(text, seconds):
    assert kernels.seconds_argument(text) == seconds


@pytest.mark.parametrize("bad", ["-3", "soon", "nan"])
def test_seconds_argument_refuses_what_is_not_a_time_limit(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="seconds"):
        kernels.seconds_argument(bad)


def test_cell_error_reads_like_a_sentence():
    err = kernels.CellError(cell=3, cells=9, first_line="model.fit()",
                            ename="RuntimeError", evalue="out of memory")
    assert str(err) == ("cell 3 of 9 (model.fit()): "
                        "RuntimeError: out of memory")
    early = kernels.CellError(cell=None, cells=9, first_line="",
                              ename="RuntimeError", evalue="no kernel")
    assert str(early).startswith("before the first cell")


def test_a_cells_error_is_told_in_one_line():
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("\n  " + "x" * 100 + " = 1 / 0\n")])
    exc = CellExecutionError("traceback", "ZeroDivisionError",
                             "division by zero\nmore lines")
    err = kernels.cell_error(nb, 0, exc)
    assert (err.cell, err.ename, err.evalue) == (
        1, "ZeroDivisionError", "division by zero")
    assert len(err.first_line) == 72 and err.first_line.endswith("...")
    assert kernels.error_line(ValueError("first:\nsecond")) == "first"


@pytest.mark.slow
def test_a_spent_budget_skips_own_cells_but_not_the_extra_ones(tmp_path):
    """The grader's way: errors and interrupts do not stop the run; once
    the notebook's time is spent its own cells are skipped, and the
    cells `extra` picks still run, each with its own limit."""
    cells = [nbformat.v4.new_code_cell("import time\ntime.sleep(30)"),
             nbformat.v4.new_code_cell("ran = 'own'"),
             nbformat.v4.new_code_cell("print('extra ran')")]
    cells[2].metadata["extra"] = True
    nb = nbformat.v4.new_notebook(cells=cells)
    done = []
    run = kernels.run_notebook(
        nb, kernels.kernel_manager(), dict(os.environ), tmp_path,
        timeout=2, allow_errors=True, interrupt_on_timeout=True,
        extra=lambda cell: cell.metadata.get("extra", False),
        extra_timeout=60,
        on_executed=lambda cell, index, timed_out: done.append(
            (index, timed_out)),
        shutdown="immediate")
    assert run.error is None
    assert run.timed_out == {0} and run.skipped == [1]
    assert done == [(0, True), (2, False)]
    assert "extra ran" in nb.cells[2].outputs[0]["text"]
