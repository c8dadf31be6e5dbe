"""tlhelpers.cluster: tasks on a Dask LocalCluster end, whatever happens."""

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tlhelpers import cluster

distributed = pytest.importorskip("dask.distributed")


def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def slow(x):
    time.sleep(x)
    return os.getpid()


@pytest.fixture(scope="module")
def client():
    import cloudpickle

    # The workers cannot import this test module: send its functions.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with cluster.connect("local:2") as c:
        yield c


def test_a_local_cluster_leaves_the_environment_as_it_was(monkeypatch):
    """Dask's nannies set OMP_NUM_THREADS=1 (and more) in the process that
    starts them; later course kernels would inherit one thread."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    before = dict(os.environ)
    with cluster.connect("local:1") as c:
        assert c.submit(square, 3).result(timeout=60) == 9
    assert dict(os.environ) == before


def test_environ_kept_undoes_additions_changes_and_removals(monkeypatch):
    monkeypatch.setenv("TLH_TEST_CHANGED", "before")
    monkeypatch.setenv("TLH_TEST_REMOVED", "here")
    monkeypatch.delenv("TLH_TEST_ADDED", raising=False)
    with cluster.environ_kept():
        os.environ["TLH_TEST_ADDED"] = "1"
        os.environ["TLH_TEST_CHANGED"] = "after"
        del os.environ["TLH_TEST_REMOVED"]
    assert "TLH_TEST_ADDED" not in os.environ
    assert os.environ["TLH_TEST_CHANGED"] == "before"
    assert os.environ["TLH_TEST_REMOVED"] == "here"


@pytest.mark.parametrize("text, expected", [
    ("local:2", ("local", 2)),
    ("tcp://10.1.2.3:8786", ("remote", "tcp://10.1.2.3:8786")),
])
def test_parse_address(text, expected):
    assert cluster.parse_address(text) == expected


@pytest.mark.parametrize("text", ["local:0", "local:x", "", "a b"])
def test_parse_address_explains_bad_input(text):
    with pytest.raises(ValueError, match="--dask"):
        cluster.parse_address(text)


@pytest.mark.slow
def test_results_come_back_in_order(client):
    seen = []
    outcomes = cluster.run_tasks(client, square, [3, 1, 2], deadline=60,
                                 on_done=lambda i, o: seen.append(i))
    assert [o.value for o in outcomes] == [9, 1, 4]
    assert all(o.ok for o in outcomes)
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.slow
def test_a_failing_task_becomes_an_outcome_and_the_others_finish(client):
    outcomes = cluster.run_tasks(client, fail_on_three, [1, 3, 5],
                                 deadline=60)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert "three is not allowed" in outcomes[1].error
    assert [outcomes[0].value, outcomes[2].value] == [1, 5]


@pytest.mark.slow
def test_a_worker_killed_mid_run_still_yields_every_result(client):
    pids = list(client.run(os.getpid).values())
    assert len(pids) == 2
    futures_done = []

    def kill_first_worker(i, outcome):
        futures_done.append(i)

    # Four tasks of 2 s on two workers: kill one worker while they run.
    start = time.monotonic()
    import threading

    killer = threading.Timer(1.0, os.kill, (pids[0], signal.SIGKILL))
    killer.start()
    try:
        outcomes = cluster.run_tasks(client, slow, [2, 2, 2, 2],
                                     deadline=120, on_done=kill_first_worker)
    finally:
        killer.cancel()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert pids[0] not in {o.value for o in outcomes}
    assert sorted(futures_done) == [0, 1, 2, 3]
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_tasks_past_the_deadline_are_cancelled_not_waited_for(client):
    outcomes = cluster.run_tasks(client, slow, [0, 60], deadline=5)
    assert outcomes[0].ok
    assert not outcomes[1].ok and "deadline" in outcomes[1].error


# ------------------------------------- grading on a LocalCluster (--dask)

from tlhelpers import grading  # noqa: E402

SUBMISSIONS = (Path(__file__).parent / "fixtures" / "submissions")
# Two notebooks that need a kernel (one scored on held-out images the
# grader draws) and one that does not: small, quick in SMOKE mode.
COHORT = ("kim/05_choosing_a_strategy.ipynb",
          "vandal/02_feature_extraction.ipynb", "broken.ipynb")
SEED = 1234
TIMEOUT = 120


def _sandbox_or_skip():
    problem = grading.sandbox_problem()
    if problem and os.environ.get("CI"):
        pytest.fail(f"CI must grade in the sandbox: {problem}")
    if problem:
        pytest.skip(f"no sandbox here: {problem}")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The small cohort, and its gradebook graded here with --jobs 2."""
    _sandbox_or_skip()
    root = tmp_path_factory.mktemp("cohort")
    for name in COHORT:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SUBMISSIONS / name, root / name)
    out = tmp_path_factory.mktemp("local") / "gradebook.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLH_SMOKE", "1")
        book = grading.grade([root], out=out, timeout=TIMEOUT, jobs=2,
                             seed=SEED, progress=False)
    assert [r.status for r in book.rows] == ["invalid notebook", "ok",
                                             "ok"], book.rows
    return root, out.read_bytes()


def _grade_on(address, root, out):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLH_SMOKE", "1")
        return grading.grade([root], out=out, timeout=TIMEOUT, jobs=2,
                             seed=SEED, progress=False, dask=address)


@pytest.mark.slow
def test_a_local_cluster_gives_the_local_gradebook_byte_for_byte(
        cohort, tmp_path):
    root, local = cohort
    out = tmp_path / "gradebook.csv"
    _grade_on("local:2", root, out)
    assert out.read_bytes() == local
    feedback = sorted(p.name for p in (tmp_path / "gradebook_feedback")
                      .iterdir())
    assert len(feedback) == 3


@pytest.mark.slow
def test_a_worker_killed_mid_run_still_yields_every_row(cohort, tmp_path):
    root, local = cohort
    killed = []
    with cluster.environ_kept(), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1,
                                     processes=True, dashboard_address=None,
                                     host="127.0.0.1") as local_cluster, \
            distributed.Client(local_cluster) as watcher:
        pids = watcher.run(os.getpid)

        def kill_a_busy_worker():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not killed:
                for address, keys in watcher.processing().items():
                    if any("tlcourse-task" in str(k) for k in keys):
                        time.sleep(2)   # its notebook is running now
                        os.kill(pids[address], signal.SIGKILL)
                        killed.append(address)
                        return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        out = tmp_path / "gradebook.csv"
        book = _grade_on(local_cluster.scheduler_address, root, out)
        killer.join(5)
    assert killed, "no worker was ever busy with a notebook"
    assert sorted(r.file for r in book.rows) == sorted(COHORT)
    # The lost notebook ran again on the other worker: same gradebook.
    assert out.read_bytes() == local


def test_dask_without_dask_installed_says_what_to_install(
        tmp_path, monkeypatch, capsys):
    shutil.copy(SUBMISSIONS / "other_course.ipynb", tmp_path / "a.ipynb")
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    out = tmp_path / "gradebook.csv"
    code = grading.main([str(tmp_path / "a.ipynb"), "--out", str(out),
                         "--dask", "local:2", "--no-sandbox",
                         "--no-progress"])
    assert code == grading.EXIT_CLUSTER
    assert "pip install 'tlhelpers[cluster]'" in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_dask_address_is_a_usage_error(tmp_path, capsys):
    shutil.copy(SUBMISSIONS / "other_course.ipynb", tmp_path / "a.ipynb")
    code = grading.main([str(tmp_path / "a.ipynb"), "--dask", "local:0",
                         "--no-sandbox", "--no-progress",
                         "--out", str(tmp_path / "g.csv")])
    assert code == grading.EXIT_USAGE
    assert "after 'local:' give the number of workers" in \
        capsys.readouterr().err


def test_the_run_deadline_grows_with_notebooks_and_shrinks_with_workers():
    one = grading.run_deadline(60, notebooks=10, workers=10)
    assert grading.run_deadline(60, notebooks=20, workers=10) > one
    assert grading.run_deadline(60, notebooks=10, workers=1) > one
    assert one >= 2 * grading.notebook_limit(60)   # room for the retry
    assert grading.run_deadline(0, 1, 1) > 86400   # 0: no time limit


def broken_task(task):
    raise OSError("the worker's disk is full")


@pytest.mark.slow
def test_a_task_that_fails_twice_is_a_grader_error_row(
        tmp_path, monkeypatch, capsys):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for name in ("kim/05_choosing_a_strategy.ipynb", "other_course.ipynb"):
        (tmp_path / "subs" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SUBMISSIONS / name, tmp_path / "subs" / name)
    monkeypatch.setattr(grading, "_run_task", broken_task)
    out = tmp_path / "gradebook.csv"
    code = grading.main([str(tmp_path / "subs"), "--out", str(out),
                         "--dask", "local:1", "--no-sandbox",
                         "--no-progress"])
    assert code == grading.EXIT_UNGRADED
    rows = {r.split(",")[0]: r for r in out.read_text().splitlines()[1:]}
    assert "grader error" in rows["kim"]
    assert "the worker's disk is full" in rows["kim"]
    assert "not this course" in rows["other_course"]
