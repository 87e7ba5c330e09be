"""Typed configuration: models.yaml and tasks.yaml, validated at the edge.

Everything past this module works on these frozen pydantic objects; a bad file never
gets as far as Ray or a model load. Errors are reported as one line naming the file
and the field (`ConfigError`), and the CLI turns them into exit status 2.
"""

from __future__ import annotations

import math

import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sweep.backends import DEFAULT_BACKEND
from sweep.presets import PRESETS, RANDOM_PREFIX

BUILTIN_DATASET = "builtin"


# Ray's own resources; a model asks for custom ones only (sweep sets GPU and CPU per worker).
RAY_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory", "accelerator_type"})
CUSTOM_RESOURCE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,99}")
RESOURCE_UNITS = 10_000


class ConfigError(Exception):
    """A configuration problem, already phrased as `file: field: what is wrong`."""


class _Strict(BaseModel):
    # No .inf or .nan anywhere: they are no setting, and JSON (the manifest) cannot hold them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or only whitespace")
    return text


def concurrency_levels(levels: tuple[int, ...]) -> tuple[int, ...]:
    if not levels:
        raise ValueError("must list at least one level, e.g. [1, 4, 16]")
    for n in levels:
        if isinstance(n, bool) or n < 1 or n > 4096:
            raise ValueError(f"each level is a number of requests in flight, 1 to 4096 (got {n!r})")
    if len(set(levels)) != len(levels):
        raise ValueError("levels must be unique")
    return tuple(levels)


class ServerSpec(_Strict):
    """How the `server` backend reaches its serving engine: a command the worker starts on its
    own GPUs (placeholders: {path} {port} {dtype} {context_length} {max_new_tokens} {gpus}
    {concurrency}), or the URL of one already running."""

    command: str | None = Field(default=None, min_length=1)
    url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    ready_timeout_s: float = Field(default=900.0, gt=0)
    engine: str | None = None  # its name and version where the server does not say


class ModelSpec(_Strict):
    """One entry of models.yaml."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1, description="Hub id, local directory, or random:<preset>")
    conv_template: str | None = None
    params_b: float | None = Field(default=None, gt=0, description="Parameters, billions")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    backend: str = Field(default=DEFAULT_BACKEND, description="Generation backend: transformers | compiled | server")
    gpus: int = Field(default=1, ge=1)
    revision: str | None = None
    trust_remote_code: bool = False
    tasks: tuple[str, ...] | None = Field(default=None, description="Subset of tasks.yaml; default all")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="Ray custom resources each worker needs, e.g. {node_b: 1}")
    server: ServerSpec | None = None  # backend: server only
    # Requests in flight at once, one job each (default: tasks.yaml generation.concurrency).
    concurrency: tuple[int, ...] | None = None

    @field_validator("concurrency")
    @classmethod
    def _concurrency_levels(cls, levels: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None if levels is None else concurrency_levels(levels)

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        # GPUs and CPUs are `gpus` and the driver's business; names are what `ray start
        # --resources` accepts, so a typo fails here rather than leave a worker pending.
        for name, amount in resources.items():
            if not CUSTOM_RESOURCE.fullmatch(name):
                raise ValueError(f"resource name {name[:60]!r}: use letters, digits, '_', '-', '.' or ':', "
                                 f"starting with a letter or '_'")
            if name in RAY_RESOURCES:
                raise ValueError(f"resource {name!r} is set by sweep itself (use gpus: for GPUs)")
            if not amount > 0:
                raise ValueError(f"resource {name!r}: must be a positive number (got {amount!r})")
            # Ray keeps resource amounts in units of 1/10,000 and refuses finer ones.
            if abs(amount * RESOURCE_UNITS - round(amount * RESOURCE_UNITS)) > 1e-6 * max(1.0, amount):
                raise ValueError(f"resource {name!r}: at most 4 decimals, as Ray takes it (got {amount!r})")
        return resources

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        # Any other text works (files are named from a hash-suffixed slug of it); a
        # control character (a newline) would break every one-line message naming it, and
        # an invisible format character (a bidirectional override, a zero-width space)
        # reverses the rest of a line or makes two names look the same.
        for c in name:
            if unicodedata.category(c) == "Cc":
                raise ValueError("must not contain control characters (newline, tab, ...)")
            if unicodedata.category(c) == "Cf":
                raise ValueError(f"must not contain invisible format characters (U+{ord(c):04X} "
                                 f"{unicodedata.name(c, 'format character')})")
        return _not_blank(name)

    @field_validator("path")
    @classmethod
    def _known_preset(cls, path: str) -> str:
        if path.startswith(RANDOM_PREFIX):
            preset = path[len(RANDOM_PREFIX):]
            if preset not in PRESETS:
                raise ValueError(f"unknown random-weight preset {preset!r}; known: {', '.join(PRESETS)}")
        return path

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from sweep.backends import BACKENDS

        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
        return name

    @model_validator(mode="after")
    def _backend_fits(self) -> "ModelSpec":
        from sweep.backends import SPEC_CHECKS

        SPEC_CHECKS[self.backend](self)  # each backend checks its own options
        return self

    @field_validator("conv_template")
    @classmethod
    def _known_template(cls, name: str | None) -> str | None:
        if name is not None:
            from fastchat.conversation import conv_templates  # light import: no model code

            if name not in conv_templates:
                raise ValueError(f"unknown FastChat template {name!r}")
        return name


class ModelsFile(_Strict):
    models: tuple[ModelSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "ModelsFile":
        seen: set[str] = set()
        for spec in self.models:
            if spec.name in seen:
                raise ValueError(f"model name {spec.name!r} appears twice")
            seen.add(spec.name)
        return self


class TaskSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    system_prompt: str = Field(min_length=1)

    @field_validator("system_prompt")
    @classmethod
    def _some_prompt(cls, text: str) -> str:
        return _not_blank(text)


class GenerationSettings(_Strict):
    """Shared by every model, as in the 2023 leaderboard."""

    batch_size: Literal[1] = 1
    temperature: float = Field(default=0.7, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=512, ge=1)
    context_length: int = Field(default=2048, ge=2)
    # "static" compiles the decode step on GPU (several times faster at batch 1);
    # "dynamic" is plain HF generate, as in the 2023 measurement.
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    warmup_requests: int = Field(default=3, ge=0)
    # Requests in flight at once: one job per level (models.yaml may override per model);
    # above 1 only through backend: server.
    concurrency: tuple[int, ...] = (1,)

    @field_validator("concurrency")
    @classmethod
    def _concurrency_levels(cls, levels: tuple[int, ...]) -> tuple[int, ...]:
        return concurrency_levels(levels)

    @model_validator(mode="after")
    def _room_for_prompt(self) -> "GenerationSettings":
        if self.max_new_tokens >= self.context_length:
            raise ValueError("max_new_tokens must be smaller than context_length")
        return self


class EnergySettings(_Strict):
    """How each job checks its own energy figures (sweep/measure.py): a few of its requests
    are measured again the reference way, the same request repeated inside one long window.
    How many: `reference_share` of the job's prompts, as far as `max_reference_cost` of the
    job's GPU time allows, and at least `min_references` (0 turns the checks off)."""

    reference_share: float = Field(default=0.01, ge=0, le=1)
    min_references: int = Field(default=1, ge=0)
    max_reference_cost: float = Field(default=0.05, ge=0, le=1)
    reference_window_s: float = Field(default=5.0, ge=1.0, le=600)

    def references_for(self, prompts: int, request_s: float | None, check_s: float) -> int:
        """How many of a job's `prompts` to check, its requests taking about `request_s`
        each and one check `check_s`."""
        budget = self.max_reference_cost * prompts * request_s / check_s if request_s and check_s > 0 else 0.0
        return min(prompts, max(self.min_references, min(math.ceil(self.reference_share * prompts), int(budget))))


class PromptSettings(_Strict):
    dataset: str = Field(default=BUILTIN_DATASET, description="ShareGPT-format JSON path, or 'builtin'")
    num_prompts: int = Field(default=3000, ge=1)
    seed: int = 0


class TasksFile(_Strict):
    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    generation: GenerationSettings = GenerationSettings()
    prompts: PromptSettings = PromptSettings()
    energy: EnergySettings = EnergySettings()

    @model_validator(mode="after")
    def _unique_names(self) -> "TasksFile":
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("task names must be unique")
        return self


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}not valid YAML") from None


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_run_id(run_id: str) -> str:
    """A run id names a folder under --out: a safe, single path component."""
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"command line: --run-id: {run_id[:120]!r} is not a run id: use 1-100 letters, digits, "
                          f"'.', '_' or '-', starting with a letter or digit")
    return run_id


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _first_error(path: Path, exc: ValidationError) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    got = ""
    if err["type"] not in ("missing", "extra_forbidden") and not isinstance(err.get("input"), (dict, list)):
        got = f" (got {err.get('input')!r})"
    # An error inside a list also empties the list ("at least 1 item"): not a second problem.
    more = sum(1 for e in exc.errors()[1:] if tuple(e["loc"]) != tuple(err["loc"])[: len(e["loc"])])
    tail = f" [+{more} more]" if more else ""
    return ConfigError(f"{path}: {_field_path(err['loc'])}: {msg}{got}{tail}")


def load_models(path: str | Path) -> ModelsFile:
    path = Path(path)
    try:
        return ModelsFile.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise _first_error(path, exc) from None


def load_tasks(path: str | Path) -> TasksFile:
    """Load tasks.yaml; a relative dataset path is resolved against the file's folder."""
    path = Path(path)
    try:
        tasks = TasksFile.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise _first_error(path, exc) from None
    dataset = tasks.prompts.dataset
    if dataset != BUILTIN_DATASET:
        resolved = (path.parent / Path(dataset).expanduser()).resolve()
        if not resolved.is_file():
            raise ConfigError(f"{path}: prompts.dataset: file not found ({resolved})")
        tasks = tasks.model_copy(update={"prompts": tasks.prompts.model_copy(update={"dataset": str(resolved)})})
    return tasks


def check_model_tasks(models_path: str | Path, models: ModelsFile, tasks: TasksFile,
                      tasks_path: str | Path = "tasks.yaml") -> None:
    known = {t.name for t in tasks.tasks}
    for i, spec in enumerate(models.models):
        levels = spec.concurrency or tasks.generation.concurrency
        if spec.backend != "server" and max(levels) > 1:
            where = (f"{models_path}: models[{i}].concurrency" if spec.concurrency
                     else f"{tasks_path}: generation.concurrency")
            raise ConfigError(f"{where}: {spec.name!r} (backend {spec.backend}) serves one request at a time; "
                              f"concurrency above 1 needs backend: server (set concurrency: [1] on the model)")
        for j, task in enumerate(spec.tasks or ()):
            if task not in known:
                raise ConfigError(
                    f"{models_path}: models[{i}].tasks[{j}]: unknown task {task!r} (tasks: {', '.join(sorted(known))})"
                )


def with_overrides(tasks: TasksFile, max_prompts: int | None, max_new_tokens: int | None) -> TasksFile:
    """Apply the CLI's quick-run overrides, re-validated like the file itself."""
    data = tasks.model_dump()
    if max_prompts is not None:
        data["prompts"]["num_prompts"] = max_prompts
    if max_new_tokens is not None:
        data["generation"]["max_new_tokens"] = max_new_tokens
    try:
        return TasksFile.model_validate(data)
    except ValidationError as exc:
        raise _first_error(Path("command line"), exc) from None
