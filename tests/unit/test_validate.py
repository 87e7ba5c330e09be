"""Quality flags per row, the power timeline, and `sweep validate`'s checks:
each with a case that passes and one that fails. GPU readings are faked the way Zeus's
own tests do (its GPU objects replaced); the end-to-end cases are in test_sweep.py."""

from dataclasses import replace

import pytest
import yaml

from sweep.quality import row_flags
from sweep.validate import ERROR, WARNING, collect, run_checks
from tests.helpers import ROOT, make_run, synthetic_rows


# -- flags -----------------------------------------------------------------------------
CLEAN = dict(metered=True, window_s=5.0, energy_j=1500.0, zero_counter=False, counter_reset=False, idle_power_w=100.0,
             power_limit_w=700.0, stop_reason="stop_token", prompt_truncated=False)


@pytest.mark.parametrize("change,flag", [
    ({"window_s": 0.5, "energy_j": 150.0}, "coarse_window"),
    ({"zero_counter": True}, "zero_counter"),
    ({"counter_reset": True, "energy_j": None}, "counter_reset"),
    ({"energy_j": 5.0 * 79.0}, "power_below_idle"),  # 79 W < 0.8 x 100 W
    ({"energy_j": 5.0 * 771.0}, "power_above_limit"),  # 771 W > 1.1 x 700 W
    ({"stop_reason": "length"}, "max_new_tokens"),
    ({"prompt_truncated": True}, "prompt_truncated"),
])
def test_each_flag_fires_alone(change, flag):
    assert row_flags(**CLEAN) == []
    assert row_flags(**{**CLEAN, **change}) == [flag]


def test_power_bounds_are_inclusive_of_their_edges_and_cpu_rows_have_no_energy_flags():
    assert row_flags(**{**CLEAN, "energy_j": 5.0 * 80.0}) == []  # exactly 0.8 x idle
    assert row_flags(**{**CLEAN, "energy_j": 5.0 * 770.0}) == []  # exactly 1.1 x limit
    cpu = dict(CLEAN, metered=False, window_s=0.01, energy_j=None, idle_power_w=None, power_limit_w=None)
    assert row_flags(**cpu) == []
    assert row_flags(**{**cpu, "stop_reason": "length"}) == ["max_new_tokens"]


class FakeGPUs:
    """Zeus's GPU interface, with an energy counter that returns the given readings (mJ)."""

    def __init__(self, readings_mj, limit_mw=700_000):
        self.readings = iter(readings_mj)
        self.limit_mw = limit_mw

    def __len__(self):
        return 1

    def supports_get_total_energy_consumption(self, index):
        return True

    def get_total_energy_consumption(self, index):
        return next(self.readings)

    def get_power_management_limit(self, index):
        return self.limit_mw


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install FakeGPUs as Zeus's GPUs, and a torch that says CUDA is there."""
    import torch
    import zeus.device.gpu as zeus_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)

    def install(readings_mj, limit_mw=700_000):
        monkeypatch.setattr(zeus_gpu, "_gpus", FakeGPUs(readings_mj, limit_mw))

    return install


def _window(readings_mj):
    from sweep.meters.zeus import EnergyMeter

    meter = EnergyMeter(1)
    meter.begin("r")
    return meter, meter.end("r")


@pytest.mark.parametrize("readings,energy,zero,reset", [
    ([1_000, 501_000], 500.0, False, False),
    ([7_000, 7_000], None, True, False),  # a window shorter than the counter period reads 0: no figure
    ([900_000, 1_000], None, False, True),  # the counter went backwards
])
def test_meter_readings_through_zeus(fake_gpu, readings, energy, zero, reset):
    fake_gpu(readings)
    meter, reading = _window(readings)
    assert meter.available and meter.power_limit_w == 700.0
    assert reading.energy_j == energy and reading.zero_counter is zero and reading.counter_reset is reset
    assert (reading.note is None) == (energy is not None)
    assert reading.end_unix_s >= reading.start_unix_s > 0
    flags = row_flags(metered=True, window_s=reading.time_s, energy_j=reading.energy_j,
                      zero_counter=reading.zero_counter, counter_reset=reading.counter_reset, idle_power_w=100.0,
                      power_limit_w=meter.power_limit_w, stop_reason="stop_token", prompt_truncated=False)
    assert "coarse_window" in flags  # a window of microseconds
    assert ("zero_counter" in flags) is zero and ("counter_reset" in flags) is reset


# -- the power timeline ------------------------------------------------------------------
class FakePowerMonitor:
    def __init__(self):
        self.samples = {0: [], 1: []}

    def get_power_timeline(self, domain, gpu_index=None, start_time=None, end_time=None):
        return {i: [s for s in samples if start_time is None or s[0] >= start_time] for i, samples in self.samples.items()}


def test_timeline_samples_are_written_once():
    from sweep.meters.timeline import PowerTimeline

    power = FakePowerMonitor()
    timeline = PowerTimeline(2, [4, 5], "h", power_monitor=power, temperature_monitor=None)
    power.samples[0] += [(100.0, 200.0), (101.0, 400.0)]
    power.samples[1] += [(100.0, 100.0)]
    first = timeline.take("m", "chat").to_pandas()
    assert len(first) == 3 and set(first["gpu_index"]) == {4, 5} and first["temperature_c"].isna().all()
    power.samples[0] += [(103.0, 250.0)]
    second = timeline.take("m", "chat").to_pandas()
    assert len(second) == 1 and second["power_w"].tolist() == [250.0]  # nothing twice


# -- validate's checks ------------------------------------------------------------------
TASKS = yaml.safe_load((ROOT / "tasks.yaml").read_text())


def _facts(tmp_path, jobs, failures=(), temperatures=None, prompts=4):
    """RunFacts of a run holding `jobs` (lists of rows), planned as models x {chat} x p0..p{prompts-1}."""
    store = make_run(tmp_path, "r", jobs)
    for f in failures:
        store.record_failure(*f)
    facts = collect(store)
    models = sorted({rows[0]["model"] for rows in jobs})
    return replace(facts, planned_jobs=[(m, "chat") for m in models], planned_prompts={f"p{i}" for i in range(prompts)},
                   max_temperature_c=temperatures or {})


def _failed(facts, check):
    return [e for e in run_checks(facts) if e.check == check and not e.passed]


def _passed(facts, check):
    es = [e for e in run_checks(facts) if e.check == check]
    return bool(es) and all(e.passed for e in es)


def _rows(model="m", n=4, energy=1000.0, **kw):
    # 10 s windows at 100 W idle: 100 W mean power is idle; 1000 J is 100 W, so use more
    return synthetic_rows("r", model, "chat", [energy] * n, [100] * n, latency=[5.0] * n, **kw)


def test_complete(tmp_path):
    assert _passed(_facts(tmp_path / "a", [_rows()]), "complete")
    [e] = _failed(_facts(tmp_path / "b", [_rows(n=3)]), "complete")
    assert e.severity == ERROR and "m / chat: 3 of 4 prompts stored, 1 missing" in e.message


def test_stored_once(tmp_path):
    assert _passed(_facts(tmp_path / "a", [_rows()]), "stored_once")
    rows = _rows()
    [e] = _failed(_facts(tmp_path / "b", [rows, rows[:1]]), "stored_once")
    assert e.severity == ERROR and "m / chat: 5 rows, 1 duplicated" in e.message


def test_energy_present(tmp_path):
    assert _passed(_facts(tmp_path / "a", [_rows()]), "energy_present")
    rows = _rows()
    rows[0] = dict(rows[0], energy_j=None, energy_note=None)
    [e] = _failed(_facts(tmp_path / "b", [rows]), "energy_present")
    assert e.severity == ERROR and "1 of 4 GPU rows without energy, 1 without a reason" in e.message
    cpu = [dict(r, gpu_name="CPU", gpu_index=None, energy_j=None, energy_note=None) for r in _rows()]
    [e] = _failed(_facts(tmp_path / "c", [cpu]), "energy_present")
    assert "4 CPU rows, 4 without a reason" in e.message
    cpu = [dict(r, energy_note="no GPU energy counter (CPU run)") for r in cpu]
    assert _passed(_facts(tmp_path / "d", [cpu]), "energy_present")


def test_idle_power(tmp_path):
    assert _passed(_facts(tmp_path / "a", [_rows()]), "idle_power")
    hot = [dict(r, idle_power_w=400.0) for r in _rows()]  # more than half of a 700 W limit
    [e] = _failed(_facts(tmp_path / "b", [hot]), "idle_power")
    assert e.severity == ERROR and "implausible" in e.message
    other = [dict(r, gpu_index=1, idle_power_w=200.0) for r in _rows(model="n")]
    [e] = _failed(_facts(tmp_path / "c", [_rows(), other]), "idle_power_spread")
    assert e.severity == WARNING and "differs by 100% across 2 GPUs" in e.message


def test_flagged_share(tmp_path):
    assert _passed(_facts(tmp_path / "a", [_rows()]), "flagged_share")
    rows = [dict(r, quality_flags=["coarse_window"]) if i < 2 else r for i, r in enumerate(_rows())]
    [e] = _failed(_facts(tmp_path / "b", [rows]), "flagged_share")
    assert e.severity == WARNING and "50% of measured rows flagged (50% with windows under 1 s" in e.message


def test_gpu_busy(tmp_path):
    assert _passed(_facts(tmp_path / "a", [_rows()]), "gpu_busy")  # 200 W against 100 W idle
    idle = [dict(r, mean_power_w=105.0) for r in _rows()]
    [e] = _failed(_facts(tmp_path / "b", [idle]), "gpu_busy")
    assert "1.05 x idle (the GPU waits on the host" in e.message


def test_worker_spread(tmp_path):
    two = _rows() + [dict(r, prompt_id=f"p{i + 4}", gpu_index=1) for i, r in enumerate(_rows())]
    assert _passed(_facts(tmp_path / "a", [two], prompts=8), "worker_spread")
    two = _rows() + [dict(r, prompt_id=f"p{i + 4}", gpu_index=1, energy_j=1300.0) for i, r in enumerate(_rows())]
    [e] = _failed(_facts(tmp_path / "b", [two], prompts=8), "worker_spread")
    assert "m / chat (transformers) on H200: J/token differs by 30% across 2 workers" in e.message


def test_failed_jobs_and_temperature(tmp_path):
    facts = _facts(tmp_path / "a", [_rows()], temperatures={"h GPU 0": 70.0})
    assert _passed(facts, "no_failed_jobs") and _passed(facts, "temperature")
    facts = _facts(tmp_path / "b", [_rows()], failures=[("m", "chat", "RuntimeError: CUDA error: out of memory")],
                   temperatures={"h GPU 0": 91.0})
    [e] = _failed(facts, "no_failed_jobs")
    assert e.severity == ERROR and e.message == "m / chat failed: RuntimeError: CUDA error: out of memory"
    [e] = _failed(facts, "temperature")
    assert "h GPU 0: highest temperature 91 C" in e.message


def test_power_files_of_a_job_are_merged_with_its_rows(tmp_path):
    from sweep.meters.timeline import PowerTimeline
    from sweep.store import RunStore, job_slug
    from sweep.validate import temperatures

    store = RunStore(tmp_path / "r")
    store.create()
    power = FakePowerMonitor()

    class Temps:
        def get_temperature_timeline(self, start_time=None):
            return {0: [(101.5, 61)], 1: [(101.5, 64)]}

    timeline = PowerTimeline(2, [0, 1], "h", power_monitor=power, temperature_monitor=Temps())
    slug = job_slug("m", "chat")
    for k in range(3):
        power.samples[0].append((100.0 + k, 200.0 + k))
        store.write_power_part(timeline.take("m", "chat"), slug)
    assert len(store.power_files()) == 3 and temperatures(store) == {"h GPU 0": 61.0, "h GPU 1": 64.0}
    store.compact(slug)
    [merged] = store.power_files()
    got = store.read_power().to_pandas()
    assert merged.name.endswith(".merged.parquet")
    assert sorted(got["power_w"].dropna()) == [200.0, 201.0, 202.0] and got["temperature_c"].notna().sum() == 2
    assert temperatures(store) == {"h GPU 0": 61.0, "h GPU 1": 64.0}


def test_a_merge_of_power_files_cut_short_leaves_no_sample_twice(tmp_path, monkeypatch):
    from pathlib import Path

    from sweep.record import POWER_SCHEMA
    from sweep.store import RunStore, job_slug

    store = RunStore(tmp_path / "r")
    store.create()
    slug = job_slug("m", "chat")

    def part(k):
        import pyarrow as pa

        store.write_power_part(pa.table({"model": ["m"], "task": ["chat"], "host": ["h"], "gpu_index": [0],
                                         "timestamp": [1_700_000_000_000_000 + k], "power_w": [float(k)],
                                         "temperature_c": [None]}, schema=POWER_SCHEMA), slug)

    part(1), part(2)
    real = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # a crash before the removals
    store.compact_power(slug)
    monkeypatch.setattr(Path, "unlink", real)
    assert len(store.power_files()) == 1 and store.read_power().num_rows == 2
    part(3)
    store.compact_power(slug)  # merges the merged file and the new one; the first inputs go too
    assert sorted(store.read_power()["power_w"].to_pylist()) == [1.0, 2.0, 3.0]
    assert len(list(store.power_dir.glob("*.parquet"))) == 1


def test_plan_follows_the_sessions_tasks_and_an_unreadable_one_is_said(tmp_path):
    from sweep.validate import _planned_jobs

    manifest = {"models": [{"name": "m", "path": "random:llama-tiny"}], "tasks": TASKS,
                "sessions": [{"tasks": ["chat"]}, {"tasks": ["instruct"]}]}
    assert _planned_jobs(manifest) == ([("m", "chat"), ("m", "instruct")], None)
    manifest["sessions"].append({"argv": []})  # a session from before sessions recorded their tasks: all of them
    assert len(_planned_jobs(manifest)[0]) == len(TASKS["tasks"])
    planned, why = _planned_jobs(dict(manifest, models=[{"name": "m", "path": "random:llama-tiny", "gpus": 0}]))
    assert planned is None and "cannot be read" in why
    facts = replace(_facts(tmp_path, [_rows()]), planned_jobs=None, plan_note=why)
    [e] = [e for e in run_checks(facts) if e.check == "complete"]
    assert not e.passed and e.severity == WARNING and "cannot be read" in e.message


def test_rows_from_before_mean_power_are_not_judged_host_bound(tmp_path):
    rows = [dict(r, mean_power_w=None) for r in _rows()]
    assert not [e for e in run_checks(_facts(tmp_path, [rows])) if e.check == "gpu_busy"]
