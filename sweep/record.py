"""The one definition of a result row: one request, what was asked and what was done.

`ResultRow` is what a worker builds; `RESULT_SCHEMA` (the Parquet dataset's schema) is
derived from it, so the row format is written down once. Columns added later are
nullable: older runs read with this schema show them empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

import pyarrow as pa


_REQUIRED = object()


def _col(arrow_type: pa.DataType, doc: str = "", default=_REQUIRED):
    """A column; `default` for later columns that most backends leave empty."""
    meta = {"arrow": arrow_type, "doc": doc}
    return field(metadata=meta) if default is _REQUIRED else field(default=default, metadata=meta)


@dataclass(frozen=True)
class ResultRow:
    run_id: str = _col(pa.string())
    model: str = _col(pa.string())
    model_path: str = _col(pa.string())
    task: str = _col(pa.string())
    prompt_id: str = _col(pa.string())
    host: str = _col(pa.string())
    gpu_name: str = _col(pa.string())
    gpu_index: int | None = _col(pa.int32(), "physical index of the worker's first GPU; null on CPU")
    num_gpus: int = _col(pa.int32())
    params_b: float = _col(pa.float64(), "parameters, billions")
    prompt_tokens: int = _col(pa.int32())
    prompt_truncated: bool = _col(pa.bool_())
    response_tokens: int = _col(pa.int32(), "generated tokens up to, not including, the stop token")
    latency_s: float = _col(pa.float64())
    ttft_s: float | None = _col(pa.float64())
    throughput_tok_s: float | None = _col(pa.float64())
    energy_j: float | None = _col(pa.float64(), "null when not measured, see energy_note; how: energy_method")
    energy_per_token_j: float | None = _col(pa.float64(), "this row's energy_j / response_tokens (aggregate energy_per_token is a ratio of sums)")
    idle_power_w: float | None = _col(pa.float64(), "the worker's GPUs at rest, measured before the job")
    energy_above_idle_j: float | None = _col(pa.float64())
    energy_note: str | None = _col(pa.string())
    stop_reason: str = _col(pa.string())
    response: str = _col(pa.string())
    started_at: datetime = _col(pa.timestamp("us", tz="UTC"))
    backend: str = _col(pa.string())
    dtype: str = _col(pa.string())
    template: str = _col(pa.string())
    temperature: float = _col(pa.float64())
    top_p: float = _col(pa.float64())
    repetition_penalty: float = _col(pa.float64())
    max_new_tokens: int = _col(pa.int32())
    cache_implementation: str = _col(pa.string(), "the cache the backend used, not the one asked for")
    compiled: bool | None = _col(pa.bool_(), "decode step compiled / replayed as a CUDA graph")
    steps_past_stop: int | None = _col(pa.int32(), "decode steps inside the window after the stop")
    quality_flags: list[str] = _col(pa.list_(pa.string()), "what makes this row's figures coarse or suspect (sweep/quality.py); empty when clean")
    window_s: float | None = _col(pa.float64(), "length of the energy window, seconds")
    mean_power_w: float | None = _col(pa.float64(), "energy_j / window_s")
    power_limit_w: float | None = _col(pa.float64(), "the worker's GPUs' enforced power limit (NVML), summed")
    prefill_energy_j: float | None = _col(pa.float64(), "energy of [start, first token], from the power timeline")
    decode_energy_j: float | None = _col(pa.float64(), "energy of [first token, end], from the power timeline")
    energy_split_method: str | None = _col(pa.string(), "how prefill/decode energy were computed")
    energy_method: str | None = _col(pa.string(), "how energy_j was obtained: 'window' (the request's own counter "
                                                  "window, long enough to stand alone) or 'attributed' (from the "
                                                  "counter's increments over the job); null in runs from before")
    energy_uncertainty_j: float | None = _col(pa.float64(), "1 sigma of energy_j")
    window_energy_j: float | None = _col(pa.float64(), "the one-window reading: the counter at the window's end "
                                                       "less at its start (coarse below a few seconds)")
    energy_model: str | None = _col(pa.string(), "the attribution's fit per GPU (JSON: the counter's lag and width, "
                                                 "phase powers, scale, increments), where energy_j used it")
    engine: str | None = _col(pa.string(), "the serving engine and its version (backend server), from the server "
                                           "where it tells, else from the command", None)
    engine_command: str | None = _col(pa.string(), "how the engine was started, or the URL attached to", None)
    tokens_from: str | None = _col(pa.string(), "what counted response_tokens: 'backend' (the model's own tokens), "
                                                "'server usage' or 'tokenizer' (the response's text re-tokenized)", None)

    concurrency: int = _col(pa.int32(), "requests in flight at once in this row's job (1: one at a time, as in "
                                       "2023); null in runs from before, read as 1", 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RESULT_SCHEMA = pa.schema([(f.name, f.metadata["arrow"]) for f in fields(ResultRow)])


def job_key(task: str, concurrency: int = 1) -> str:
    """The name of a job's task in the store, the writer and the failure records: the task
    itself at concurrency 1 (as before there was concurrency), `<task>@c<N>` above. Task
    names cannot hold '@' (tasks.yaml)."""
    return task if concurrency == 1 else f"{task}@c{concurrency}"


def split_job_key(key: str) -> tuple[str, int]:
    """(task, concurrency) of a job key."""
    task, sep, n = key.partition("@c")
    return (task, int(n)) if sep and n.isdigit() else (key, 1)


# A job's reference check (sweep/measure.py): one of its requests, the same seed each time,
# repeated inside one long window; `sweep validate` compares it with the request's row.
REFERENCE_SCHEMA = pa.schema([
    ("model", pa.string()),
    ("task", pa.string()),
    ("prompt_id", pa.string()),
    ("host", pa.string()),
    ("gpu_name", pa.string()),
    ("gpu_index", pa.int32()),
    ("repeats", pa.int32()),  # requests inside the window
    ("window_s", pa.float64()),  # from the first repeat's start to the last one's end
    ("energy_j", pa.float64()),  # per request: the counter over the window, less the gaps', over the repeats
    ("energy_note", pa.string()),  # why energy_j is null
    ("response_tokens", pa.list_(pa.int32())),  # of each repeat: the same seed gives the same tokens
    ("cost_s", pa.float64()),  # GPU time the check took, its idle pauses included
    ("started_at", pa.timestamp("us", tz="UTC")),
])


# The power timeline of a worker's GPUs (sweep/meters/timeline.py), in runs/<id>/power/.
POWER_SCHEMA = pa.schema([
    ("model", pa.string()),  # the job open when the samples were written
    ("task", pa.string()),
    ("host", pa.string()),
    ("gpu_index", pa.int32()),  # physical index, as gpu_index in the results
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("power_w", pa.float64()),  # null on a temperature sample
    ("temperature_c", pa.float64()),  # null on a power sample
])
