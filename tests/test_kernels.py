"""tlhelpers.kernels: threads, OpenMP waiting and the allocator."""

import json
import subprocess
import sys

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


@pytest.mark.slow
def test_a_course_kernel_reads_the_settings_back(tmp_path):
    """The settings reach the kernel process itself (read inside it)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import json, os, torch\n"
        "print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY'),\n"
        "                  'threads': torch.get_num_threads()}))")]
    path = tmp_path / "01_probe.ipynb"
    nbformat.write(nb, path)
    build = runner.run_course([path], tmp_path / "out", progress=False,
                              timeout=300)
    assert build.ok
    done = nbformat.read(tmp_path / "out" / path.name, as_version=4)
    seen = json.loads(done.cells[0].outputs[0]["text"])
    assert seen == {"omp": kernels.WAIT_POLICY,
                    "threads": kernels.default_threads()}
