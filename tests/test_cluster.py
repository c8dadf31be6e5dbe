"""tlhelpers.cluster: tasks on a Dask LocalCluster end, whatever happens."""

import os
import signal
import sys
import time

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
