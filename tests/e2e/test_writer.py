"""The session's writer: one owner of the run directory, rows acknowledged once durable."""

import errno
import fcntl
import os
import statistics
import time

import pytest

from sweep.store import RunStore, job_slug
from sweep.writer import RunWriter, StaleJob, WrongNode

from tests.helpers import synthetic_rows


def _run(tmp_path) -> tuple[RunStore, str]:
    """A run directory as a driver leaves it: created, its driver lock written."""
    store = RunStore(tmp_path / "r")
    store.create()
    text = "pid 1 on driver-host"
    (store.locks_dir / "driver.lock").write_text(text + "\n")
    return store, text


def test_rows_stored_once_and_the_job_released(tmp_path):
    store, lock = _run(tmp_path)
    w = RunWriter(str(store.run_dir), lock)
    rows = synthetic_rows("r", "m", "chat", [1.0, 2.0, 3.0], [5, 6, 7])
    token, done = w.open_job("m", "chat")
    assert done == []
    for row in rows[:2]:
        w.append("m", "chat", token, row)
    # acknowledged means in the log, fsync'ed: a crash now keeps both rows
    assert set(store.done_prompt_ids("m", "chat")[("m", "chat")]) == {"p0", "p1"}
    # a worker that took over (the first one died) resumes after what is stored
    token2, done = w.open_job("m", "chat")
    assert done == ["p0", "p1"] and token2 != token
    with pytest.raises(StaleJob):  # the presumed-dead worker's late row is refused
        w.append("m", "chat", token, rows[2])
    w.append("m", "chat", token2, rows[2])
    w.close_job("m", "chat", token2)
    df = store.read_results()
    assert sorted(df["prompt_id"]) == ["p0", "p1", "p2"]
    assert not list(store.wal_dir.iterdir())
    with pytest.raises(StaleJob):
        w.append("m", "chat", token2, rows[0])


def test_a_job_held_elsewhere_is_busy_until_released(tmp_path):
    store, lock = _run(tmp_path)
    w = RunWriter(str(store.run_dir), lock)
    with open(store.locks_dir / f"{job_slug('m', 'chat')}.lock", "w") as other:  # a writer of a killed driver
        fcntl.flock(other, fcntl.LOCK_EX)
        assert w.open_job("m", "chat") is None
        fcntl.flock(other, fcntl.LOCK_UN)
    assert w.open_job("m", "chat") is not None
    assert w.close_all() == 1


def test_a_writer_that_cannot_see_the_drivers_run_refuses_to_start(tmp_path):
    store, _ = _run(tmp_path)
    with pytest.raises(WrongNode, match="must run on the driver's node"):
        RunWriter(str(store.run_dir), "pid 2 on elsewhere")
    with pytest.raises(WrongNode):
        RunWriter(str(tmp_path / "absent"), "pid 1 on driver-host")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_acknowledged_append_latency_and_errors_through_ray(tmp_path, ray_local):
    """What storing through the writer actor adds per request, against appending in the
    worker's own process as before; and a full disk at the writer reads as one at the worker."""
    from sweep.worker import RemoteJob, _cause
    from sweep.store import is_disk_full
    from sweep.writer import start_writer

    ray = ray_local
    store, lock = _run(tmp_path)
    n = 200
    rows = synthetic_rows("r", "m", "chat", [1.0] * n, [100] * n)
    for row in rows:
        row["response"] = "word " * 400  # a long response: ~2 KB of text per row

    local = store.writer("local")
    local_s = []
    for row in rows:
        t = time.perf_counter()
        local.append({**row, "model": "local"})
        local_s.append(time.perf_counter() - t)
    local.close()

    writer = start_writer(store.run_dir, "r", lock)

    @ray.remote(num_cpus=0)
    def serve(writer, rows):
        job = RemoteJob(writer, "m", "chat")
        took = []
        for row in rows:
            t = time.perf_counter()
            job.append(row)
            took.append(time.perf_counter() - t)
        job.close()
        return took

    remote_s = ray.get(serve.remote(writer, rows))
    added_ms = (statistics.mean(remote_s) - statistics.mean(local_s)) * 1e3
    print(f"\nacknowledged append, {n} rows: through the writer actor mean {statistics.mean(remote_s) * 1e3:.2f} ms "
          f"(median {statistics.median(remote_s) * 1e3:.2f}), in-process {statistics.mean(local_s) * 1e3:.2f} ms; "
          f"added {added_ms:.2f} ms per request")
    df = store.read_results()
    assert (df["model"] == "m").sum() == n and not df.duplicated(["model", "prompt_id"]).any()
    assert added_ms < 50, "the writer adds too much per request"

    @ray.remote(num_cpus=0)
    class Full:
        def append(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(Full.remote().append.remote())
    assert is_disk_full(_cause(err.value)) and "No space left" in str(_cause(err.value))
    ray.kill(writer)


def test_a_remote_job_keeps_one_row_in_flight_and_raises_its_failure_later(tmp_path, ray_local):
    """`append` hands a row over and returns; when it returns, every earlier row is
    durable. A row the writer could not store raises at the next append or at close, and
    close still releases the job."""
    from sweep.worker import RemoteJob, _cause
    from sweep.store import is_disk_full
    from sweep.writer import start_writer

    ray = ray_local
    store, lock = _run(tmp_path)
    writer = start_writer(store.run_dir, "r", lock)
    rows = synthetic_rows("r", "m", "chat", [1.0] * 5, [5] * 5)

    @ray.remote(num_cpus=0)
    def serve(writer, rows, run_dir):
        job = RemoteJob(writer, "m", "chat")
        durable = []
        for row in rows:
            job.append(row)
            durable.append(RunStore(run_dir).done_prompt_ids("m", "chat").get(("m", "chat"), set()))
        job.close()
        return durable

    durable = ray.get(serve.remote(writer, rows, str(store.run_dir)))
    ids = [r["prompt_id"] for r in rows]
    for i, stored in enumerate(durable):
        assert set(ids[:i]) <= stored, (i, stored)  # at most the row just handed over is in flight
    assert set(store.read_results()["prompt_id"]) == set(ids)
    ray.kill(writer)

    @ray.remote(num_cpus=0)
    class FailsOn:
        def __init__(self, prompt_id):
            self.prompt_id, self.closed = prompt_id, False

        def open_job(self, model, task):
            return "t", []

        def append(self, model, task, token, row):
            if row["prompt_id"] == self.prompt_id:
                raise OSError(errno.ENOSPC, "No space left on device")

        def close_job(self, model, task, token):
            self.closed = True

        def was_closed(self):
            return self.closed

    @ray.remote(num_cpus=0)
    def appends_until_error(writer, rows):
        job = RemoteJob(writer, "m", "chat")
        handed = []
        try:
            for row in rows:
                job.append(row)
                handed.append(row["prompt_id"])
            job.close()
        except Exception as exc:
            return handed, is_disk_full(_cause(exc))
        return handed, None

    middle = FailsOn.remote("p1")
    handed, disk_full = ray.get(appends_until_error.remote(middle, rows))
    assert handed == ["p0", "p1"] and disk_full  # p1's failure raised when p2 was handed over
    last = FailsOn.remote("p4")
    handed, disk_full = ray.get(appends_until_error.remote(last, rows))
    assert handed == ids and disk_full  # the last row's failure raised at close
    assert ray.get(last.was_closed.remote())  # and the job was still released


def test_a_row_counts_when_the_writer_acknowledged_it_and_a_dead_writer_is_named(tmp_path, ray_local):
    """The writer dies while it stores a row: the rows counted are those it acknowledged
    (the row it died on is not), and the error names the writer and says a rerun completes."""
    from sweep.worker import RemoteJob, WriterGone

    ray = ray_local

    @ray.remote(num_cpus=0, max_restarts=0)
    class DiesOn:
        def __init__(self, prompt_id):
            self.prompt_id, self.stored = prompt_id, []

        def open_job(self, model, task):
            return 1, []

        def append(self, model, task, token, row):
            if row["prompt_id"] == self.prompt_id:
                os._exit(1)
            self.stored.append(row["prompt_id"])

        def close_job(self, model, task, token):
            pass

    @ray.remote(num_cpus=0)
    def serve(writer, rows):
        counted = []
        job = RemoteJob(writer, "m", "chat", on_stored=lambda: counted.append(1))
        try:
            for row in rows:
                job.append(row)
            job.close()
        except WriterGone as exc:
            return len(counted), str(exc)
        return len(counted), None

    rows = synthetic_rows("r", "m", "chat", [1.0] * 6, [5] * 6)
    counted, error = ray.get(serve.remote(DiesOn.remote("p3"), rows))
    assert counted == 3  # p0, p1, p2: what the writer acknowledged
    assert error is not None and "writer" in error and "rerun with the same --run-id" in error
