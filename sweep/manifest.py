"""What a run was: config snapshot, software versions, hardware, times (manifest.json).

`SweepManifest` (a sweep's run) and `ImportedManifest` (imported aggregates) are the one
definition of the file: the driver writes through them and every reader validates what it
reads with them (`parse_manifest`), so a file with fields of the wrong type is found once,
where it is read, and set aside like any damaged file. Keys this version does not know
are kept: a manifest written by a newer sweep still reads.
"""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import time
from importlib import metadata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sweep.config import ConfigError, ModelsFile, TasksFile

_PACKAGES = ("torch", "transformers", "zeus", "ray", "fschat", "pyarrow", "sweep")
KIND_SWEEP, KIND_IMPORTED = "per-request", "aggregate-only"


class _Open(BaseModel):
    # No NaN or Infinity: the file is strict JSON.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Session(_Open):
    """One driver session on the run: started, and finished (absent while it runs)."""

    started_at: str | None = None
    finished_at: str | None = None
    argv: list[str] | None = None
    tasks: list[str] | None = None  # the tasks this session was asked for (`--task`)
    written: int | None = None
    failed: int | None = None
    interrupted: bool | None = None
    disk_full: str | None = None


class ModelEntry(_Open):
    name: str
    path: str | None = None
    backend: str | None = None


class TaskEntry(_Open):
    name: str
    system_prompt: str | None = None


class TasksSnapshot(_Open):
    tasks: list[TaskEntry] = []
    generation: dict = {}
    prompts: dict = {}


class PromptInfo(_Open):
    source: str | None = None
    count: int | None = None
    available: int | None = None
    skipped_empty: int | None = None
    sha256: str | None = None  # of the sampled prompts' (id, text) pairs (`prompts_digest`)


class GpuEntry(_Open):
    host: str | None = None
    gpu_name: str | None = None
    gpu_index: int | None = None
    driver_version: str | None = None


class SweepManifest(_Open):
    kind: Literal["per-request"] = KIND_SWEEP
    run_id: str
    started_at: str | None = None
    host: str | None = None
    versions: dict[str, str | None] = {}
    models: list[ModelEntry] = []
    tasks: TasksSnapshot | None = None
    prompts: PromptInfo = PromptInfo()
    gpus: list[GpuEntry] = []
    sessions: list[Session] = []
    renamed_from: list[str] = []  # earlier names of the run's folder (`adopt_folder_name`)


class ImportedManifest(_Open):
    kind: Literal["aggregate-only"]
    run_id: str
    source: str | None = None
    imported_from: str | None = None
    imported_at: str | None = None
    gpus: list[str] = []
    tasks: list[str] = []


def parse_manifest(data: object) -> SweepManifest | ImportedManifest:
    """The manifest's model of a parsed manifest.json; raises ValueError naming the first
    field that is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    cls = ImportedManifest if data.get("kind") == KIND_IMPORTED else SweepManifest
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise ValueError(f"{'.'.join(map(str, err['loc'])) or 'top level'}: {err['msg']}") from None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def prompts_digest(prompts) -> str:
    """SHA-256 of the (prompt_id, text) pairs, in order: what a resume compares."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.prompt_id, p.text]).encode())
        h.update(b"\n")
    return h.hexdigest()


def new_manifest(run_id: str, models: ModelsFile, tasks: TasksFile, prompt_info: dict) -> dict:
    manifest = {
        "run_id": run_id,
        "kind": KIND_SWEEP,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "versions": versions(),
        "models": [m.model_dump(mode="json") for m in models.models],
        "tasks": tasks.model_dump(mode="json"),
        "prompts": prompt_info,
        "gpus": [],
        "sessions": [],
    }
    SweepManifest.model_validate(manifest)  # what every reader will check it against
    return manifest


def _diff(old, new, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _diff(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{path} was {old!r}, now {new!r}"


class _Resumable(BaseModel):
    """What a resume needs of a stored manifest beyond `SweepManifest` (other keys may be there too)."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    tasks: dict
    models: list[ModelEntry]
    sessions: list[dict]
    gpus: list[dict]


def stored_manifest(store) -> dict | None:
    """The manifest of a run to resume; None for a new run, or when the file is damaged
    (then it is set aside, and the run counts as one without a manifest)."""
    manifest = store.read_manifest()
    if manifest is None:
        return None
    if manifest.get("kind") == KIND_IMPORTED:
        raise ConfigError(f"{store.manifest_path}: this run holds imported results, not a sweep; use another --run-id")
    try:
        _Resumable.model_validate(manifest)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(map(str, err["loc"]))
        store.set_aside(store.manifest_path, f"damaged manifest ({where}: {err['msg']})")
        return None
    return manifest


def adopt_folder_name(manifest: dict, folder_name: str) -> str | None:
    """A run's identity is its folder. A resume of a folder that was renamed or copied
    takes the folder's name as the run id and records the old one; returns the old name
    (None when they agree)."""
    old = manifest["run_id"]
    if old == folder_name:
        return None
    manifest["run_id"] = folder_name
    manifest.setdefault("renamed_from", []).append(old)
    return old


def merge_for_resume(manifest: dict, models: ModelsFile, tasks: TasksFile, tasks_path: str, models_path: str) -> dict:
    """Check that a resumed run measures under the same conditions; add new models.

    Raises ConfigError naming the first setting that differs from the stored run."""
    # A run started before the energy section existed measured with its defaults' windows;
    # its rows say how each energy was obtained (energy_method), so it resumes as it is.
    manifest["tasks"].setdefault("energy", tasks.model_dump(mode="json")["energy"])
    changed = _diff(manifest["tasks"], tasks.model_dump(mode="json"))
    if changed:
        raise ConfigError(f"{tasks_path}: {changed} in the stored run {manifest['run_id']}; use a new --run-id")
    stored = {m["name"]: m for m in manifest["models"]}
    for i, spec in enumerate(models.models):
        old = stored.get(spec.name)
        if old is None:
            manifest["models"].append(spec.model_dump(mode="json"))
            continue
        old.setdefault("tasks", None)  # runs stored before these fields existed
        old.setdefault("backend", "transformers")
        new = spec.model_dump(mode="json")
        # Where a worker runs (`resources`) is no measurement setting: each row records its
        # host and GPU, and a resume may place the model elsewhere.
        old["resources"] = new["resources"]
        changed = _diff(old, new)
        if changed:
            raise ConfigError(f"{models_path}: models[{i}].{changed} in the stored run; use a new --run-id")
    return manifest
