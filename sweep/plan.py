"""The plan of jobs, and which job or model goes next.

A job is one (model, task, concurrency). Workers keep a loaded model for all of its tasks, so the
scheduler hands a finished worker the next job of the same model; a free GPU slot goes
first to a model nobody runs yet, then to the model with the most jobs still waiting
(a second copy of it, so that no GPU idles while work remains).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sweep.config import ModelsFile, TasksFile
from sweep.record import job_key


@dataclass(frozen=True)
class Job:
    model: str
    task: str
    concurrency: int = 1

    @property
    def key(self) -> str:
        """The job's task as the store and the writer name it (sweep.record.job_key)."""
        return job_key(self.task, self.concurrency)

    def __str__(self) -> str:
        return f"{self.model} / {self.task}" + (f" / concurrency {self.concurrency}" if self.concurrency > 1 else "")


def make_plan(models: ModelsFile, tasks: TasksFile) -> list[Job]:
    order = [t.name for t in tasks.tasks]
    return [Job(m.name, t, n) for m in models.models for t in order if m.tasks is None or t in m.tasks
            for n in (m.concurrency or tasks.generation.concurrency)]


class Scheduler:
    """Bookkeeping of waiting jobs and running workers; no Ray in here.

    `width[model]` is how many slots (GPUs, or CPU workers) one worker of it takes.
    """

    def __init__(self, jobs: list[Job], width: dict[str, int], capacity: int) -> None:
        self.waiting: dict[str, deque[Job]] = {}
        for job in jobs:
            self.waiting.setdefault(job.model, deque()).append(job)
        self.width = width
        self.free = capacity
        self.live: dict[str, int] = {m: 0 for m in self.waiting}

    def has_waiting(self) -> bool:
        return any(self.waiting.values())

    def model_for_new_worker(self) -> str | None:
        """The model a new worker should load now, or None if nothing fits."""
        candidates = [m for m, q in self.waiting.items() if q and self.width[m] <= self.free]
        if not candidates:
            return None
        fresh = [m for m in candidates if self.live[m] == 0]
        if fresh:
            return fresh[0]
        return max(candidates, key=lambda m: len(self.waiting[m]))

    def worker_started(self, model: str) -> None:
        self.free -= self.width[model]
        self.live[model] += 1

    def worker_stopped(self, model: str) -> None:
        self.free += self.width[model]
        self.live[model] -= 1

    def next_job(self, model: str) -> Job | None:
        queue = self.waiting.get(model)
        return queue.popleft() if queue else None

    def requeue(self, job: Job) -> None:
        self.waiting[job.model].appendleft(job)

    def drop_model(self, model: str) -> list[Job]:
        """Take every waiting job of `model` out of the plan (it cannot load)."""
        dropped = list(self.waiting.get(model, ()))
        self.waiting[model] = deque()
        return dropped
