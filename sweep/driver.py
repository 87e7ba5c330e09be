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
    """Run `jobs` on a Ray cluster (started here, or joined at opts.address) and return
    what happened; stored rows are kept whatever happens."""
    auth_for_joining(opts.address)
    return _Sweep(opts, models, tasks, prompt_set, jobs, stored).run()


@dataclass
class _Sweep:
    """One session's Ray loop: a worker actor per model slot, jobs handed out as workers
    free up, a dead worker replaced and its job resumed (MAX_ATTEMPTS), failures recorded."""

    opts: SweepOptions
    models: ModelsFile
    tasks: TasksFile
    prompt_set: PromptSet
    jobs: list[Job]
    stored: dict[tuple[str, str], int]
    outcome: SweepOutcome = field(default_factory=SweepOutcome)
    inflight: dict = field(default_factory=dict)  # ray ref -> (actor, model, job)
    attempts: dict = field(default_factory=dict)  # job -> workers it was given to
    serial: dict = field(default_factory=dict)  # model -> workers started

    def __post_init__(self) -> None:
        self.store = RunStore(self.opts.run_dir)
        self.specs = {m.name: m for m in self.models.models}
        self.bars = self.hub = self.writer = self.ray_record = None

    def run(self) -> SweepOutcome:
        import ray

        try:
            self._start()
            self._loop()
            self.bars.update(ray.get(self.hub.snapshot.remote()))
            self.bars.close()
        except (KeyboardInterrupt, _DiskFull) as exc:
            if isinstance(exc, _DiskFull):
                self.outcome.disk_full = str(exc)
            else:
                self.outcome.interrupted = True
            try:  # count what the stopped jobs stored (their rows are safe in the log)
                self.bars.update(ray.get(self.hub.snapshot.remote(), timeout=5))
            except Exception:
                pass
        finally:
            if self.bars is not None:
                self.outcome.written = sum(self.bars.stored.values()) - sum(self.stored.values())
            if self.writer is not None:
                _close_writer(self.writer, self.outcome)
            ray.shutdown()
            ray_sessions.forget(self.ray_record)
        return self.outcome

    def _fail(self, job: Job, error: str) -> None:
        try:
            self.store.record_failure(job.model, job.key, error)
        except OSError as exc:
            if is_disk_full(exc):
                raise _DiskFull(str(exc)) from None
            raise
        self.outcome.failed.append({"model": job.model, "task": job.key, "error": error})

    def _start(self) -> None:
        """Ray, the writer on this node, the jobs no node can take failed at once, the
        scheduler, the progress hub and bars."""
        import ray

        from sweep.progress import ProgressBars, ProgressHub
        from sweep.worker import Worker
        from sweep.writer import start_writer

        opts, store = self.opts, self.store
        ctx, self.ray_record = _start_ray(opts)
        _print_dashboard(ctx)
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        self.gpu_mode = cluster_gpus > 0
        per_node = max((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]), default=0)
        self.width = {m: (self.specs[m].gpus if self.gpu_mode else 1) for m in self.specs}
        capacity = cluster_gpus if self.gpu_mode else opts.cpu_workers
        where = f"{cluster_gpus} GPU(s)" if self.gpu_mode else f"{opts.cpu_workers} CPU worker(s), no GPU"
        print(f"Run {opts.run_id}: {len(self.jobs)} job(s) on {where}; results in {store.results_dir}", flush=True)
        if not self.gpu_mode:
            print("No NVIDIA GPU in the cluster: energy_j will be empty (each row's energy_note says why). "
                  "Energy needs a GPU node, e.g. python -m sweep --config models-gpu.yaml", flush=True)
        self.writer = start_writer(store.run_dir, opts.run_id, (store.locks_dir / "driver.lock").read_text().strip())
        try:
            ray.get(self.writer.where.remote())
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the run's writer did not start on the driver's node: {exc}") from None
        runnable = []
        for job in self.jobs:
            w = self.width[job.model]
            if self.gpu_mode and w > per_node:
                self._fail(job, f"needs {w} GPUs on one node; the largest node has {per_node}")
            elif missing := _unplaceable(self.specs[job.model].resources, w if self.gpu_mode else 0):
                self._fail(job, missing)
            else:
                runnable.append(job)
        self.sched = Scheduler(runnable, self.width, capacity)
        self.hub = ray.remote(num_cpus=0)(ProgressHub).options(name=f"sweep progress [{opts.run_id}]").remote()
        self.worker_cls = ray.remote(Worker)
        self.prompts_ref = ray.put(list(self.prompt_set.prompts))
        self.tasks_json = self.tasks.model_dump(mode="json")
        self.bars = ProgressBars(len(self.jobs) * len(self.prompt_set.prompts), self.stored, enabled=opts.progress)

    def _assign(self, actor, model: str) -> bool:
        job = self.sched.next_job(model)
        if job is None:
            return False
        self.attempts[job] = self.attempts.get(job, 0) + 1
        ref = actor.run_job.options(name=str(job)).remote(job.key, self.prompts_ref)
        self.inflight[ref] = (actor, model, job)
        return True

    def _retire(self, actor, model: str) -> None:
        import ray

        ray.kill(actor)
        self.sched.worker_stopped(model)

    def _start_workers(self) -> None:
        while (model := self.sched.model_for_new_worker()) is not None:
            self.serial[model] = self.serial.get(model, 0) + 1
            slots = self.width[model]
            actor = self.worker_cls.options(
                name=f"{model} #{self.serial[model]} [{self.opts.run_id}]",
                num_gpus=slots if self.gpu_mode else 0,
                num_cpus=0 if self.gpu_mode else 1,
                resources=dict(self.specs[model].resources),
                max_restarts=0,
            ).remote(self.opts.run_id, self.specs[model].model_dump(mode="json"), self.tasks_json,
                     slots if self.gpu_mode else 0, self.hub, self.writer)
            self.sched.worker_started(model)
            self._assign(actor, model)

    def _loop(self) -> None:
        import ray

        while self.sched.has_waiting() or self.inflight:
            self._start_workers()
            if not self.inflight:
                break
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=POLL_S)
            self.bars.update(ray.get(self.hub.snapshot.remote()))
            for ref in ready:
                self._finished(ref, *self.inflight.pop(ref))

    def _finished(self, ref, actor, model: str, job: Job) -> None:
        """A worker's job returned (or its worker died): the next job, a retry, or a failure."""
        import ray

        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.sched.worker_stopped(model)
            if self.attempts[job] < MAX_ATTEMPTS:
                print(f"\nworker for {job} died ({type(exc).__name__}); resuming the job on a new worker", flush=True)
                self.sched.requeue(job)
            else:
                self._fail(job, f"worker died {self.attempts[job]} times; last: {exc}")
            return
        if result["device"] not in self.outcome.devices:
            self.outcome.devices.append(result["device"])
        if result.get("disk_full"):
            raise _DiskFull(f"writing {self.store.run_dir} ({job}): {result['error']}")
        if result["ok"]:
            self.store.clear_failure(job.model, job.key)
            if not self._assign(actor, model):
                self._retire(actor, model)
            return
        self._fail(job, result["error"])
        self._retire(actor, model)  # after an error (OOM...) the process state is suspect
        if result["phase"] == "load":
            for dropped in self.sched.drop_model(model):
                self._fail(dropped, f"model did not load: {result['error']}")


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
