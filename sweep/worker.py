"""The Ray actor of one GPU (or of `gpus` GPUs, or one CPU slot): load, measure, store.

The actor loads its model on the first job and keeps it for every later job of the same
model. Each request is bracketed by an energy window on the actor's own GPUs, and its
row goes to the session's writer (sweep/writer.py, on the driver's node: the actor may
run on any node of a cluster) and is durable there before the request after next starts
(at most one row in flight, see RemoteJob).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import statistics
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

from sweep.config import ModelSpec, TasksFile
from sweep.prompts import Prompt
from sweep.quality import mean_power_w, row_flags
from sweep.record import ResultRow, job_key, split_job_key
from sweep.logs import warn
from sweep.store import is_disk_full

# A job still held by a writer of a killed driver is asked for again this often, this long.
OPEN_RETRY_S = 0.5
OPEN_TIMEOUT_S = 300.0
# Power samples reach the store at least this often (and when a job ends).
POWER_WRITE_S = 30.0
# Prompts the first fit of the counter cycles through (sweep.measure.CounterMeter.calibrate).
CALIBRATION_PROMPTS = 8


def request_seed(seed: int, task: str, prompt_id: str) -> int:
    """Sampling seed of one request: the same for every model and every rerun."""
    return int.from_bytes(hashlib.sha1(f"{seed}\0{task}\0{prompt_id}".encode()).digest()[:4], "little")


def calibration_prompts(prompts: list[Prompt], n: int = CALIBRATION_PROMPTS) -> list[Prompt]:
    """n of the job's prompts, evenly spread over their lengths: the first fit of the
    counter sees prefills of every size, so it tells prefill's power from decode's
    before the first row is stored."""
    by_length = sorted(prompts, key=lambda p: len(p.text))
    if len(by_length) <= n:
        return by_length
    return [by_length[round(i * (len(by_length) - 1) / (n - 1))] for i in range(n)] if n > 1 else by_length[:1]


def _device_info(num_gpus: int) -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "gpu_index": None, "gpu_name": "CPU", "driver_version": None}
    import torch

    if num_gpus and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")
        info["gpu_index"] = int(visible[0]) if visible[0].isdigit() else 0
        info["gpu_indices"] = visible[:num_gpus]
        info["gpu_name"] = torch.cuda.get_device_name(0)
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver_version"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    return info


def _start_timeline(num_gpus: int, device: dict):
    """The worker's power timeline, or None (with a warning) where Zeus cannot record one:
    the energy counter still measures every request."""
    visible = list(device.get("gpu_indices", []))
    # One physical index per GPU of the worker (positions where CUDA_VISIBLE_DEVICES says nothing).
    physical = [int(visible[n]) if n < len(visible) and str(visible[n]).isdigit() else n for n in range(num_gpus)]
    try:
        return PowerTimeline(num_gpus, physical, device["host"])
    except Exception as exc:
        warn(f"no power timeline ({type(exc).__name__}: {exc}); energy is measured as before, the UI shows no power")
        return None


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside another actor (the writer), not Ray's wrapper of it."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return exc.cause
    return exc


class WriterGone(Exception):
    """The session's writer actor died: no row can be stored until a rerun."""


class RemoteJob:
    """One job opened at the session's writer. A row is handed over without waiting: the
    writer's acknowledgement (the row is in the job's write-ahead log, fsync'ed) is
    awaited at the next `append`, after the next request has run, or at `close`. So at
    most one row is in flight: a crash loses at most it and the request in progress, and
    resume runs both again (a row is stored once or not at all). The wait, a Ray round
    trip and an fsync, overlaps the next request instead of adding to it."""

    def __init__(self, writer: Any, model: str, task: str, on_stored: Callable[[], None] = lambda: None) -> None:
        """`on_stored()` is called once per row, when the writer has acknowledged it: what
        the progress counts is what is stored, never what was only sent."""
        import ray

        self._ray, self.writer, self.model, self.task, self._on_stored = ray, writer, model, task, on_stored
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while (opened := self._get(writer.open_job.remote(model, task))) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {model} / {task} is held by another process")
            time.sleep(OPEN_RETRY_S)
        self.token, done = opened
        self.done = set(done)
        self._in_flight = None  # the last row's acknowledgement, not yet awaited

    def _get(self, ref):
        """ray.get of a call to the writer; a dead writer is named as such."""
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayActorError as exc:
            raise WriterGone(f"the run's writer (the actor that owns the run folder on the driver's node) died "
                             f"({type(exc).__name__}); rerun with the same --run-id to complete the job: every row "
                             f"it acknowledged is stored") from None

    def _settle(self) -> None:
        """Wait for the row in flight to be durable (raises what storing it raised)."""
        pending, self._in_flight = self._in_flight, None
        if pending is not None:
            self._get(pending)
            self._on_stored()

    def append(self, row: dict) -> None:
        self._settle()
        self._in_flight = self.writer.append.remote(self.model, self.task, self.token, row)

    def append_reference(self, check: dict) -> None:
        self._get(self.writer.append_reference.remote(self.model, self.task, self.token, check))

    def append_log(self, text: str) -> None:
        self._get(self.writer.append_log.remote(self.model, self.task, self.token, text))

    def append_job(self, figures: dict) -> None:
        self._get(self.writer.append_job.remote(self.model, self.task, self.token, figures))

    def append_power(self, samples) -> None:
        # The writer runs one worker's calls in the order sent: these follow the rows before them.
        self._get(self.writer.append_power.remote(self.model, self.task, self.token, samples))

    def close(self) -> None:
        """Settle the last row, then close the job at the writer (also when the row failed,
        e.g. a full disk: that error is raised after)."""
        failed = None
        try:
            self._settle()
        except WriterGone:
            raise  # nothing left to close
        except Exception as exc:
            failed = exc
        self._get(self.writer.close_job.remote(self.model, self.task, self.token))
        if failed is not None:
            raise failed


class Worker:
    """One model on `num_gpus` GPUs (0: a CPU worker). Ray wraps this class in the driver;
    `writer` is the session's RunWriter actor."""

    def __init__(self, run_id: str, spec: dict, tasks: dict, num_gpus: int, hub: Any, writer: Any = None) -> None:
        self.writer = writer
        self.run_id = run_id
        self.spec = ModelSpec.model_validate(spec)
        self.tasks = TasksFile.model_validate(tasks)
        self.num_gpus = num_gpus
        self.hub = hub
        self.backend = None
        self.meter = None
        self.timeline = None  # PowerTimeline of the worker's GPUs, when there are GPUs
        self._power_written_at = 0.0
        self.idle_power_w: float | None = None
        self.request_s: float | None = None  # a request's mean latency while calibrating
        self._log_sent = 0  # characters of the serving engine's log already stored
        self.concurrency = 1  # of the job being run
        self._shared = None  # its TokenShareJob, while one at concurrency > 1 runs
        self.device = _device_info(num_gpus)

    def _load(self, prompts: list[Prompt], system_prompt: str) -> None:
        import torch

        from sweep.backends import load_backend
        from sweep.measure import open_meter

        if not self.num_gpus:
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        device = "cuda" if self.num_gpus and torch.cuda.is_available() else "cpu"
        self.backend = load_backend(self.spec, self.tasks.generation, device)
        self.meter = open_meter(self.num_gpus if device == "cuda" else 0)
        if self.meter.available:
            self.timeline = _start_timeline(self.num_gpus, self.device)
        # Warm-up (not stored): first CUDA kernels, allocator growth, static-cache compile.
        warm = prompts[: self.tasks.generation.warmup_requests]
        for p in warm:
            self.backend.generate(system_prompt, p.text, seed=0)
        self.idle_power_w = self.meter.idle_power_w()
        if warm:  # the counter's first fit: prompts of the job's range of lengths, back to back
            cycle, took = itertools.cycle(calibration_prompts(prompts)), []

            def run():
                out = self.backend.generate(system_prompt, next(cycle).text, seed=0)
                took.append(out.latency_s)
                return out.phases()

            self.meter.calibrate(run)
            self.request_s = statistics.mean(took) if took else None

    def run_job(self, key: str, prompts: list[Prompt]) -> dict[str, Any]:
        """Run every prompt of (this model, the job `key`: a task, at a concurrency,
        sweep.record.job_key) not yet stored. Never raises for a model problem: returns
        {"ok": False, "phase": "load"|"generate", "error": ...}."""
        model = self.spec.name
        task_name, self.concurrency = split_job_key(key)
        system_prompt = next(t.system_prompt for t in self.tasks.tasks if t.name == task_name)
        phase = "load"
        try:
            job = RemoteJob(self.writer, model, key, on_stored=lambda: self.hub.advance.remote(model, key))
            try:
                todo = [p for p in prompts if p.prompt_id not in job.done]
                self.hub.start.remote(model, key, len(prompts) - len(todo), len(prompts))
                if todo and self.backend is None:
                    self._load(prompts, system_prompt)
                phase = "generate"
                if self.concurrency > 1 and todo:
                    self._serve_concurrently(job, task_name, system_prompt, todo)
                else:
                    self._serve_one_by_one(job, task_name, system_prompt, prompts, todo)
            finally:
                try:
                    if self.meter is not None:
                        self._store_ready(job, final=True)
                finally:
                    self._write_server_log(job)
                    try:
                        self._write_power(job, key)
                    except Exception as exc:  # samples are lost, never the rows: the job still closes
                        warn(f"power samples of {model} / {task_name} not stored: {exc}")
                    job.close()
        except Exception as exc:
            cause = _cause(exc)  # a full disk at the writer reads as OSError(ENOSPC) here too
            return {"ok": False, "phase": phase, "device": self.device, "disk_full": is_disk_full(cause),
                    "error": f"{type(cause).__name__}: {cause}", "traceback": traceback.format_exc()}
        finally:
            self.hub.finish.remote(model, task_name)
        return {"ok": True, "device": self.device}

    def _serve_one_by_one(self, job, task: str, system_prompt: str, prompts: list[Prompt], todo: list[Prompt]) -> None:
        checked = self._reference_ids(task, prompts) if todo and self.meter.attributes else set()
        for prompt in todo:
            self.serve(job, task, system_prompt, prompt)
            if prompt.prompt_id in checked:
                self._reference(task, system_prompt, prompt)

    def _serve_concurrently(self, job, task: str, system_prompt: str, todo: list[Prompt]) -> None:
        """`concurrency` requests in flight (a closed loop: each answer in sends the next
        prompt); each row stored once the counter has counted it; the job's steady window
        stored at its end, also when a request failed."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from sweep.concurrent import TokenShareJob

        self._shared = shared = TokenShareJob(self.meter, self.concurrency)
        queue = iter(todo)
        sent = min(self.concurrency, len(todo))

        def one(prompt: Prompt):
            request = shared.start()
            seed = request_seed(self.tasks.prompts.seed, task, prompt.prompt_id)
            return prompt, request, self.backend.generate(system_prompt, prompt.text, seed=seed,
                                                          token_times=request.tokens)

        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="sweep-request") as pool:
                pending = {pool.submit(one, p) for p in itertools.islice(queue, self.concurrency)}
                if sent == len(todo):
                    shared.last_sent()
                while pending:
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    for f in done:
                        prompt, request, out = f.result()  # a failed request fails the job (the others finish)
                        shared.end(request, (task, prompt, out), out)
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending.add(pool.submit(one, nxt))
                            sent += 1
                            if sent == len(todo):
                                shared.last_sent()
                    self._store_ready(job)
                    if time.monotonic() - self._power_written_at >= POWER_WRITE_S:
                        self._write_power(job, job_key(task, self.concurrency))
        finally:
            try:
                self._store_ready(job, final=True)
            finally:
                self._shared = None
                job.append_job(shared.summary() | {"model": self.spec.name, "task": job_key(task, self.concurrency)})

    def serve(self, writer, task: str, system_prompt: str, prompt: Prompt) -> None:
        """One request as a sweep serves it: measured, and stored durably (`writer`: a
        RemoteJob, which counts it once stored, or a store's JobWriter) once the energy
        counter has counted it, with every earlier request the counter has counted."""
        self._measure(task, system_prompt, prompt)
        self._store_ready(writer)
        if time.monotonic() - self._power_written_at >= POWER_WRITE_S:
            try:
                self._write_power(writer, task)
            except Exception as exc:
                if is_disk_full(_cause(exc)):
                    raise
                self._drop_timeline(f"power samples not stored ({type(exc).__name__}: {exc})")

    def _drop_timeline(self, why: str) -> None:
        """The timeline is an addition: a fault in it stops it, never the job or a row."""
        warn(f"{why}; the power timeline stops (energy is measured as before)")
        self.timeline = None

    def _write_server_log(self, writer) -> None:
        """What a started serving engine wrote since the last job, into the run's servers/ folder."""
        text = self.backend.log_text() if self.backend is not None and hasattr(self.backend, "log_text") else ""
        new, self._log_sent = text[self._log_sent:], len(text)
        if new:
            try:
                writer.append_log(new)
            except Exception as exc:  # a log is an addition: never a reason to fail the job
                warn(f"server log of {self.spec.name} not stored: {exc}")

    def _write_power(self, writer, task: str) -> None:
        """The power samples taken since the last write, into the run's power/ folder."""
        self._power_written_at = time.monotonic()
        if self.timeline is not None:
            samples = self.timeline.take(self.spec.name, task)
            if samples.num_rows:
                writer.append_power(samples)

    def _reference_ids(self, task: str, prompts: list[Prompt]) -> set[str]:
        """The job's prompts that are also measured the reference way (tasks.yaml `energy`):
        chosen by their seed, so a resumed job checks the same ones."""
        e = self.tasks.energy
        n = e.references_for(len(prompts), self.request_s, self.meter.reference_cost_s(e.reference_window_s))
        ranked = sorted(prompts, key=lambda p: request_seed(self.tasks.prompts.seed, task, p.prompt_id))
        return {p.prompt_id for p in ranked[:n]}

    def _reference(self, task: str, system_prompt: str, prompt: Prompt) -> None:
        seed = request_seed(self.tasks.prompts.seed, task, prompt.prompt_id)

        def run():
            out = self.backend.generate(system_prompt, prompt.text, seed=seed)
            return out.phases(), out.response_tokens

        self.meter.reference((task, prompt), run, self.tasks.energy.reference_window_s)

    def _measure(self, task: str, system_prompt: str, prompt: Prompt) -> None:
        self.meter.begin()
        out = self.backend.generate(system_prompt, prompt.text, seed=request_seed(self.tasks.prompts.seed, task, prompt.prompt_id))
        self.meter.end((task, prompt, out), out.phases())

    def _store_ready(self, writer, final: bool = False) -> None:
        """Rows (and reference checks) the meter has finished, to the writer."""
        from sweep.measure import ReferenceFigures

        if getattr(self, "_shared", None) is not None:
            for key, figures, inside in self._shared.ready(final):
                writer.append(self._row(*key, figures, outside_steady=not inside))
            return
        for key, figures in self.meter.ready(final):
            if isinstance(figures, ReferenceFigures):
                writer.append_reference(self._reference_row(figures))
            else:
                writer.append(self._row(*key, figures))

    def _reference_row(self, f) -> dict[str, Any]:
        task, prompt = f.key
        return {"model": self.spec.name, "task": task, "prompt_id": prompt.prompt_id, "host": self.device["host"],
                "gpu_name": self.device["gpu_name"], "gpu_index": self.device["gpu_index"], "repeats": f.repeats,
                "window_s": f.window_s, "energy_j": f.energy_j, "energy_note": f.note,
                "response_tokens": f.response_tokens, "cost_s": f.cost_s,
                "started_at": datetime.fromtimestamp(f.started_unix_s, timezone.utc)}

    def _row(self, task: str, prompt: Prompt, out, fig, outside_steady: bool = False) -> dict[str, Any]:
        """The stored row of one request and its energy figures (sweep.measure.EnergyFigures)."""
        energy = fig.energy_j
        g, b = self.tasks.generation, self.backend
        # the seconds energy_j covers: its window, or (attributed) the request's own phases
        energy_s = fig.window_s if fig.method == "window" else out.latency_s
        # A token-share energy has no window reading of its own, and one request's share of a
        # GPU serving many is not comparable with the GPU's idle power or limit.
        flags = row_flags(metered=self.meter.available and fig.method != "token_share", window_s=fig.window_s,
                          energy_j=energy, outside_steady=outside_steady, zero_counter=fig.zero_counter,
                          counter_reset=fig.counter_reset, idle_power_w=self.idle_power_w,
                          power_limit_w=self.meter.power_limit_w,
                          stop_reason=out.stop_reason, prompt_truncated=out.prompt_truncated, energy_s=energy_s)
        return ResultRow(
            run_id=self.run_id,
            model=self.spec.name,
            model_path=self.spec.path,
            task=task,
            prompt_id=prompt.prompt_id,
            host=self.device["host"],
            gpu_name=self.device["gpu_name"],
            gpu_index=self.device["gpu_index"],
            num_gpus=self.num_gpus,
            params_b=b.params_b,
            prompt_tokens=out.prompt_tokens,
            prompt_truncated=out.prompt_truncated,
            response_tokens=out.response_tokens,
            latency_s=out.latency_s,
            ttft_s=out.ttft_s,
            throughput_tok_s=out.response_tokens / out.latency_s if out.latency_s > 0 else None,
            energy_j=energy,
            energy_per_token_j=energy / out.response_tokens if energy is not None and out.response_tokens else None,
            idle_power_w=self.idle_power_w,
            energy_above_idle_j=(
                energy - self.idle_power_w * energy_s if energy is not None and self.idle_power_w is not None else None
            ),
            energy_note=fig.note,
            stop_reason=out.stop_reason,
            response=out.response,
            started_at=datetime.fromtimestamp(fig.start_unix_s, timezone.utc),  # the window's start
            backend=b.name,
            dtype=b.dtype_name,
            template=b.template.name,
            temperature=g.temperature,
            top_p=g.top_p,
            repetition_penalty=g.repetition_penalty,
            max_new_tokens=g.max_new_tokens,
            cache_implementation=b.effective.cache_implementation,
            compiled=b.effective.compiled,
            steps_past_stop=out.steps_past_stop,
            quality_flags=flags,
            window_s=fig.window_s,
            mean_power_w=mean_power_w(energy, energy_s),
            power_limit_w=self.meter.power_limit_w,
            prefill_energy_j=fig.prefill_j,
            decode_energy_j=fig.decode_j,
            energy_split_method=fig.split_method,
            energy_method=fig.method,
            energy_uncertainty_j=fig.uncertainty_j,
            window_energy_j=fig.window_energy_j,
            energy_model=fig.model,
            engine=b.engine,
            engine_command=b.engine_command,
            tokens_from=getattr(b, "tokens_from", None) or "backend",
            concurrency=self.concurrency,
        ).to_dict()
