"""The Ray driver: start or join a cluster, run one worker actor per GPU, collect.

The run directory is on the driver's machine. Workers may run on any node; their rows
reach the directory through the session's writer actor, pinned to this node (writer.py).

Everything that can be wrong with the input is checked before this module is entered
(see cli.py); from here on, a model that fails is recorded as a failed job and the
others go on.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep import ray_sessions
from sweep.config import ModelsFile, TasksFile
from sweep.plan import Job, Scheduler
from sweep.prompts import PromptSet
from sweep.store import RunStore, is_disk_full

# A worker that dies (SIGKILL, segfault, node loss) is replaced and its job resumed this
# many times before the job counts as failed; its stored rows are kept either way.
MAX_ATTEMPTS = 3
POLL_S = 0.5


@dataclass
class SweepOptions:
    run_id: str
    run_dir: str
    address: str | None = None
    cpu_workers: int = 1
    dashboard: bool = True
    progress: bool = True


@dataclass
class SweepOutcome:
    written: int = 0
    failed: list[dict] = field(default_factory=list)
    devices: list[dict] = field(default_factory=list)
    interrupted: bool = False
    disk_full: str | None = None  # what could not be written; the sweep stopped there


class _DiskFull(Exception):
    """The run's disk is full: no job can store anything, so the sweep stops."""


def auth_for_joining(address: str | None) -> None:
    """A cluster from `ray start` uses token auth; a driver given an explicit address only
    sends the token in token mode, which Ray reads when first imported: turn it on, before
    that import, when a token is at hand."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if address and "RAY_AUTH_MODE" not in os.environ and ("RAY_AUTH_TOKEN" in os.environ or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _start_ray(opts: SweepOptions):
    import ray

    env = {"env_vars": {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "TOKENIZERS_PARALLELISM": "false"}}
    kwargs: dict[str, Any] = {}
    if opts.address:
        kwargs.update(address=opts.address, log_to_driver=True)
    else:
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        kwargs["include_dashboard"] = opts.dashboard
        if _local_gpu_count() == 0:
            # Enough CPU slots for the requested workers (+ the progress hub, which takes none).
            kwargs["num_cpus"] = max(os.cpu_count() or 1, opts.cpu_workers)
    # ray.init replaces the SIGTERM handler with one that exits at once: keep the
    # caller's, which stops the sweep like Ctrl-C.
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    if not opts.address:
        ended = ray_sessions.end_orphans()
        if ended:
            print(f"Ended {len(ended)} process(es) left by the Ray instance of a sweep whose driver was killed",
                  flush=True)
    try:
        ctx = ray.init(runtime_env=env, **kwargs)
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    record = None if opts.address else ray_sessions.record(ctx.address_info["session_dir"])
    return ctx, record


def _local_gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _print_dashboard(ctx) -> None:
    url = getattr(ctx, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}  (sign in with the token printed by `ray get-auth-token`)", flush=True)


def run_sweep(
    opts: SweepOptions,
    models: ModelsFile,
    tasks: TasksFile,
    prompt_set: PromptSet,
    jobs: list[Job],
    stored: dict[tuple[str, str], int],
) -> SweepOutcome:
    auth_for_joining(opts.address)
    import ray

    from sweep.progress import ProgressBars, ProgressHub
    from sweep.worker import Worker
    from sweep.writer import start_writer

    store = RunStore(opts.run_dir)
    outcome = SweepOutcome()
    bars = hub = writer = ray_record = None

    def fail(job: Job, error: str) -> None:
        try:
            store.record_failure(job.model, job.task, error)
        except OSError as exc:
            if is_disk_full(exc):
                raise _DiskFull(str(exc)) from None
            raise
        outcome.failed.append({"model": job.model, "task": job.task, "error": error})

    try:
        ctx, ray_record = _start_ray(opts)
        _print_dashboard(ctx)
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        gpu_mode = cluster_gpus > 0
        per_node = max((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]), default=0)
        specs = {m.name: m for m in models.models}
        width = {m: (specs[m].gpus if gpu_mode else 1) for m in specs}
        capacity = cluster_gpus if gpu_mode else opts.cpu_workers
        where = f"{cluster_gpus} GPU(s)" if gpu_mode else f"{opts.cpu_workers} CPU worker(s), no GPU"
        print(f"Run {opts.run_id}: {len(jobs)} job(s) on {where}; results in {store.results_dir}", flush=True)
        if not gpu_mode:
            print("No NVIDIA GPU in the cluster: energy_j will be empty (each row's energy_note says why). "
                  "Energy needs a GPU node, e.g. python -m sweep --config models-gpu.yaml", flush=True)
        writer = start_writer(store.run_dir, opts.run_id, (store.locks_dir / "driver.lock").read_text().strip())
        try:
            ray.get(writer.where.remote())
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the run's writer did not start on the driver's node: {exc}") from None

        runnable = []
        for job in jobs:
            if gpu_mode and width[job.model] > per_node:
                fail(job, f"needs {width[job.model]} GPUs on one node; the largest node has {per_node}")
            elif missing := _unplaceable(specs[job.model].resources, width[job.model] if gpu_mode else 0):
                fail(job, missing)
            else:
                runnable.append(job)

        sched = Scheduler(runnable, width, capacity)
        hub = ray.remote(num_cpus=0)(ProgressHub).options(name=f"sweep progress [{opts.run_id}]").remote()
        worker_cls = ray.remote(Worker)
        prompts_ref = ray.put(list(prompt_set.prompts))
        tasks_json = tasks.model_dump(mode="json")
        bars = ProgressBars(len(jobs) * len(prompt_set.prompts), stored, enabled=opts.progress)
        inflight: dict[Any, tuple[Any, str, Job]] = {}
        attempts: dict[Job, int] = {}
        serial: dict[str, int] = {}

        def assign(actor, model: str) -> bool:
            job = sched.next_job(model)
            if job is None:
                return False
            attempts[job] = attempts.get(job, 0) + 1
            ref = actor.run_job.options(name=f"{job.model} / {job.task}").remote(job.task, prompts_ref)
            inflight[ref] = (actor, model, job)
            return True

        def retire(actor, model: str) -> None:
            ray.kill(actor)
            sched.worker_stopped(model)

        while sched.has_waiting() or inflight:
            while (model := sched.model_for_new_worker()) is not None:
                serial[model] = serial.get(model, 0) + 1
                slots = width[model]
                actor = worker_cls.options(
                    name=f"{model} #{serial[model]} [{opts.run_id}]",
                    num_gpus=slots if gpu_mode else 0,
                    num_cpus=0 if gpu_mode else 1,
                    resources=dict(specs[model].resources),
                    max_restarts=0,
                ).remote(opts.run_id, specs[model].model_dump(mode="json"), tasks_json,
                         slots if gpu_mode else 0, hub, writer)
                sched.worker_started(model)
                assign(actor, model)
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            bars.update(ray.get(hub.snapshot.remote()))
            for ref in ready:
                actor, model, job = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    sched.worker_stopped(model)
                    if attempts[job] < MAX_ATTEMPTS:
                        print(f"\nworker for {job} died ({type(exc).__name__}); resuming the job on a new worker", flush=True)
                        sched.requeue(job)
                    else:
                        fail(job, f"worker died {attempts[job]} times; last: {exc}")
                    continue
                if result["device"] not in outcome.devices:
                    outcome.devices.append(result["device"])
                if result.get("disk_full"):
                    raise _DiskFull(f"writing {store.run_dir} ({job}): {result['error']}")
                if result["ok"]:
                    store.clear_failure(job.model, job.task)
                    if not assign(actor, model):
                        retire(actor, model)
                    continue
                fail(job, result["error"])
                retire(actor, model)  # after an error (OOM...) the process state is suspect
                if result["phase"] == "load":
                    for dropped in sched.drop_model(model):
                        fail(dropped, f"model did not load: {result['error']}")
        bars.update(ray.get(hub.snapshot.remote()))
        bars.close()
    except (KeyboardInterrupt, _DiskFull) as exc:
        if isinstance(exc, _DiskFull):
            outcome.disk_full = str(exc)
        else:
            outcome.interrupted = True
        try:  # count what the stopped jobs stored (their rows are safe in the log)
            bars.update(ray.get(hub.snapshot.remote(), timeout=5))
        except Exception:
            pass
    finally:
        if bars is not None:
            outcome.written = sum(bars.stored.values()) - sum(stored.values())
        if writer is not None:
            _close_writer(writer, outcome)
        ray.shutdown()
        ray_sessions.forget(ray_record)
    return outcome


def _unplaceable(resources: dict[str, float], gpus: int) -> str | None:
    """Why no live node can take a worker that asks for `resources` (and `gpus` GPUs),
    or None: Ray would otherwise keep such an actor pending for ever, silently."""
    import ray

    if not resources:
        return None
    for node in ray.nodes():
        have = node["Resources"] if node["Alive"] else {}
        if have.get("GPU", 0) >= gpus and all(have.get(k, 0) >= v for k, v in resources.items()):
            return None
    asked = ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + (f", GPU: {gpus}" if gpus else "")
    return f"no node of the cluster has the resources the model asks for ({asked})"


def _close_writer(writer, outcome: SweepOutcome) -> None:
    """Jobs still open at the writer (stopped, or their worker died for good) get their
    rows into Parquet now; what fails here stays in the logs, recovered on resume."""
    import ray

    try:
        ray.get(writer.close_all.remote(), timeout=30)
    except ray.exceptions.RayTaskError as exc:
        if is_disk_full(exc.cause) and not outcome.disk_full:
            outcome.disk_full = f"writing {exc.cause.filename or 'the run directory'}: {exc.cause}"
    except Exception:  # interrupted, writer gone: the write-ahead logs hold the rows
        pass
