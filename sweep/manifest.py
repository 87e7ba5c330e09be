"""What a run was: config snapshot, software versions, hardware, times (manifest.json)."""

from __future__ import annotations

import platform
import socket
import time
from importlib import metadata

from pydantic import BaseModel, ConfigDict, ValidationError

from sweep.config import ConfigError, ModelsFile, TasksFile
from sweep.store import RunStore

_PACKAGES = ("torch", "transformers", "zeus", "ray", "fschat", "pyarrow", "sweep")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_manifest(run_id: str, models: ModelsFile, tasks: TasksFile, prompt_info: dict) -> dict:
    return {
        "run_id": run_id,
        "kind": "per-request",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "versions": versions(),
        "models": [m.model_dump(mode="json") for m in models.models],
        "tasks": tasks.model_dump(mode="json"),
        "prompts": prompt_info,
        "gpus": [],
        "sessions": [],
    }


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


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class _Resumable(BaseModel):
    """What a resume reads from a stored manifest (other keys may be there too)."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    tasks: dict
    models: list[_Entry]
    sessions: list[dict]
    gpus: list[dict]


def stored_manifest(store: RunStore) -> dict | None:
    """The manifest of a run to resume; None for a new run, or when the file is damaged
    (then it is set aside, and the run counts as one without a manifest)."""
    manifest = store.read_manifest()
    if manifest is None:
        return None
    if manifest.get("kind") == "aggregate-only":
        raise ConfigError(f"{store.manifest_path}: this run holds imported results, not a sweep; use another --run-id")
    try:
        _Resumable.model_validate(manifest)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(map(str, err["loc"]))
        store.set_aside(store.manifest_path, f"damaged manifest ({where}: {err['msg']})")
        return None
    return manifest


def merge_for_resume(manifest: dict, models: ModelsFile, tasks: TasksFile, tasks_path: str, models_path: str) -> dict:
    """Check that a resumed run measures under the same conditions; add new models.

    Raises ConfigError naming the first setting that differs from the stored run."""
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
