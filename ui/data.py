"""What the UI shows, read from the runs folder: aggregates, per-request rows, prompts.

Each run is re-read only when its files change (a cheap directory listing decides), and
then only its new part files: per part file the UI keeps partial sums (sweep.aggregate)
and adds them up, so the page can poll every few seconds while a sweep writes, at the
same cost at row 480,000 as at row 100. Per-request rows are read only for the model
detail, one (run, model, task) at a time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from sweep.aggregate import PART_FILE, finish, job_keys, partials, results_dataset
from sweep.report import AGGREGATES_FILE, read_imported, with_status
from sweep import validate
from sweep.logs import warn
from sweep.store import PartsChanged, RunStore, job_slug, part_job

# Columns of the leaderboard, in order, with their (short) headers; units in the header.
DISPLAY = {
    "run_id": "run",
    "gpu": "gpu",
    "model": "model",
    "backend": "backend",
    "concurrency": "in flight",
    "task": "task",
    "parameters": "params",
    "energy": "energy (J)",
    "energy_ci": "95% CI (J)",
    "energy_per_token": "J/token",
    "decode_energy_per_token": "decode J/token",
    "prefill_energy": "prefill (J)",
    "energy_above_idle": "above idle (J)",
    "response_length": "length (tok)",
    "latency": "latency (s)",
    "ttft": "TTFT (s)",
    "throughput": "tok/s",
    "responses": "responses",
    "flagged_share": "flagged (%)",
    "validation": "check",
    "arc": "arc",
    "hellaswag": "hellaswag",
    "truthfulqa": "truthfulqa",
    "energy_note": "energy note",
}
NUMERIC = ["parameters", "energy", "energy_per_token", "throughput", "response_length", "latency", "responses",
           "arc", "hellaswag", "truthfulqa", "energy_ci_low", "energy_ci_high", "ttft", "energy_above_idle",
           "decode_energy_per_token", "prefill_energy", "flagged_share"]
# What the model-detail view shows of each request.
DETAIL_COLUMNS = ["prompt_id", "response", "response_tokens", "energy_j", "energy_note", "latency_s", "gpu_name",
                  "template", "started_at", "ttft_s", "window_s", "prefill_energy_j", "decode_energy_j", "quality_flags",
                  "energy_method", "energy_uncertainty_j", "window_energy_j", "energy_split_method"]
ID_SCHEMA = pa.schema([("model", pa.string()), ("task", pa.string()), ("prompt_id", pa.string()),
                       (PART_FILE, pa.string())])
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_url(path: str | None) -> str | None:
    """The hub page of a model path that is a hub id (not a local dir or random: preset)."""
    if not path or not _HUB_ID.match(path) or os.path.exists(path):
        return None
    return f"https://huggingface.co/{path}"


@dataclass
class _Cached:
    fingerprint: tuple
    aggregates: pd.DataFrame
    partials: pa.Table | None = None  # per part file and worker, see sweep.aggregate.partials; None: aggregate-only run
    ids: pa.Table | None = None  # (model, task, prompt_id, part_file) of every row: validation counts them
    temperatures: dict = field(default_factory=dict)  # power file -> its highest temperature per GPU
    counts: dict = field(default_factory=dict)  # (model, task) -> (its part files, its stored-id counts)
    planned: set = field(default_factory=set)  # the run's prompt ids the counts were made against
    references: tuple | None = None  # (reference file names, validate.reference_facts of them)


def runtime(backend: str, concurrency: int) -> str:
    """What the Backends filter lists: the backend, with the requests it had in flight at
    once where that was more than one ("server x16"); one at a time is 2023's view."""
    return str(backend) if concurrency == 1 else f"{backend} x{int(concurrency)}"


def one_at_a_time(runtime_label: str) -> bool:
    """Whether a Backends choice serves one request at a time (the default view, 2023's)."""
    return " x" not in runtime_label


@dataclass
class RunsFolder:
    root: Path
    _cache: dict[str, _Cached] = field(default_factory=dict)
    _combined: tuple | None = None  # (the runs' fingerprints, aggregates() of them)

    def run_dirs(self) -> list[Path]:
        """Folders that hold a run (a damaged manifest, set aside, does not hide its rows)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if any((p / name).exists() for name in ("manifest.json", "results", AGGREGATES_FILE)))

    def _load(self, run_dir: Path) -> _Cached:
        imported = run_dir / AGGREGATES_FILE
        store = RunStore(run_dir)
        # Part files are written once under a unique name: their names say what changed.
        parts = tuple(p.name for p in store.part_files())
        # What else validation reads: the manifest (the plan), failures, the power timeline.
        others = (tuple(sorted((p.name, p.stat().st_mtime_ns) for p in (store.manifest_path, store.failures_dir)
                               if p.exists())) + tuple(p.name for p in store.power_files())
                  + tuple(p.name for p in store.reference_files()))
        fp = (parts, imported.stat().st_mtime_ns if imported.is_file() else None, others)
        hit = self._cache.get(run_dir.name)
        if hit is not None and hit.fingerprint == fp:
            return hit
        if imported.is_file():
            hit = _Cached(fp, read_imported(imported))
        else:
            # Part files are written once and never change: scan only the new ones (through
            # the store, which sets a damaged one aside), and drop the partials of files
            # that are gone.
            names = frozenset(parts)
            old = hit.partials if hit is not None and hit.partials is not None else None
            known = frozenset(hit.fingerprint[0]) if old is not None else frozenset()
            new = [run_dir / "results" / n for n in sorted(names - known)]
            ids: list[pa.Table] = []
            try:
                scanned = store.scan_parts(lambda paths: partials(paths, by_file=True, by_worker=True, ids=ids,
                                                                  run_id=run_dir.name), files=new)
            except PartsChanged:  # a job's files were compacted meanwhile: list the run again
                return self._load(run_dir)
            still = pa.array(sorted(names), pa.string())
            kept = [old.filter(pc.is_in(old[PART_FILE], still))] if old else []
            # In file-name order, as a scan of the folder sees the rows.
            table = pa.concat_tables(kept + [scanned]).sort_by(PART_FILE)
            kept_ids = [hit.ids.filter(pc.is_in(hit.ids[PART_FILE], still))] if old is not None and hit.ids is not None else []
            id_table = pa.concat_tables(kept_ids + ids) if kept_ids + ids else ID_SCHEMA.empty_table()
            agg = finish(table)
            hit = _Cached(fp, agg, table, id_table,
                          hit.temperatures if hit is not None else {}, hit.counts if hit is not None else {},
                          hit.planned if hit is not None else set(), hit.references if hit is not None else None)
            if not agg.empty:
                agg["url"] = agg["model_path"].map(hub_url)
                try:
                    status = self._validation(store, table, id_table, hit)
                except Exception as exc:  # the figures still show; only their check is missing
                    warn(f"{run_dir}: validation failed ({type(exc).__name__}: {exc})")
                    status = pd.DataFrame(columns=["model", "task", "validation"])
                hit.aggregates = with_status(agg, status)
        self._cache[run_dir.name] = hit
        return hit

    @staticmethod
    def _validation(store: RunStore, parts: pa.Table, ids: pa.Table, hit: _Cached) -> pd.DataFrame:
        """Per (model, task): the worst failed check of `sweep validate` ("ok", "warning",
        "error"), from the partials and ids already read. The stored-id counts of a job
        are kept until its files change: a refresh recounts only the jobs being written."""
        planned = set(store.read_prompts()["prompt_id"])
        keyed = parts.append_column("job", job_keys(parts["task"], parts["concurrency"]))
        jobs = keyed.group_by(["model", "job"], use_threads=False).aggregate([(PART_FILE, "distinct")])
        files = {(m, t): frozenset(f) for m, t, f in zip(*(jobs[c].to_pylist() for c in ("model", "job",
                                                                                        f"{PART_FILE}_distinct")))}
        if hit.planned != planned:
            hit.counts.clear()
        hit.planned = planned
        changed = [job for job, f in files.items() if hit.counts.get(job, (None,))[0] != f]
        for job in set(hit.counts) - set(files):
            del hit.counts[job]
        if changed:
            names = pa.array(sorted(set().union(*(files[j] for j in changed))), pa.string())
            counted = validate.stored_counts(ids.filter(pc.is_in(ids[PART_FILE], names)), planned)
            for row in counted.to_dict("records"):
                job = (row["model"], row["task"])
                hit.counts[job] = (files[job], row)
        stored = pd.DataFrame([row for _, row in hit.counts.values()], columns=["model", "task", "rows",
                                                                              "distinct_planned", "unplanned"])
        facts = validate.facts(store.read_manifest(), planned, parts.drop_columns([PART_FILE]), stored,
                               store.failures(), validate.temperatures(store, hit.temperatures), jobs=hit.aggregates,
                               references=RunsFolder._references(store, hit), job_records=store.job_figures())
        return validate.job_status(validate.run_checks(facts))

    @staticmethod
    def _references(store: RunStore, hit: _Cached) -> pd.DataFrame:
        """The run's reference checks with their rows; read again only when a check was
        added (a check's row is stored before it) or one still lacks its row."""
        names = tuple(p.name for p in store.reference_files())
        cached = hit.references
        if cached is None or cached[0] != names or cached[1]["row_energy_j"].isna().any():
            hit.references = (names, validate.reference_facts(store))
        return hit.references[1]

    def references(self, run_id: str, model: str, task: str) -> pd.DataFrame:
        """The reference checks of one job (validate.REFERENCE_COLUMNS)."""
        run_dir = self.run_dir(run_id)
        hit = self._cache.get(run_id) if run_dir is not None else None
        if hit is None or hit.references is None:
            return validate.reference_frame(pa.table({}))
        refs = hit.references[1]
        return refs[(refs["model"] == model) & (refs["task"] == task)]

    def aggregates(self) -> pd.DataFrame:
        """Figures of every run. Views call this once each per page event: the combined
        frame is made again only when some run's files changed."""
        hits = [(d.name, self._load(d)) for d in self.run_dirs()]
        key = tuple((run, hit.fingerprint) for run, hit in hits)
        if self._combined is None or self._combined[0] != key:
            frames = [hit.aggregates for _, hit in hits if not hit.aggregates.empty]
            if frames:
                agg = pd.concat(frames, ignore_index=True)
                for col in NUMERIC + ["url", "energy_note", "validation", "validation_detail"]:
                    if col not in agg:
                        agg[col] = np.nan
                agg["concurrency"] = agg["concurrency"].fillna(1) if "concurrency" in agg else 1
                agg["runtime"] = [runtime(b, n) for b, n in zip(agg["backend"], agg["concurrency"])]
            else:  # every column a view reads, so that an empty folder shows empty views
                agg = pd.DataFrame(columns=list(dict.fromkeys(list(DISPLAY) + NUMERIC + ["url", "measured", "runtime"])))
            self._combined = (key, agg)
        return self._combined[1].copy(deep=False)  # a caller adding a column changes its copy only

    def version(self) -> tuple:
        """What the last aggregates() read: changes when any run's files change (a page
        compares it to decide whether anything needs to be sent again)."""
        return tuple(sorted((run, hit.fingerprint) for run, hit in self._cache.items()))

    def run_dir(self, run_id: str) -> Path | None:
        """The folder of a run the page names: only a run folder directly under the runs
        folder, never a path a value in a file (or a request) spells."""
        if not isinstance(run_id, str) or not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
            return None
        path = self.root / run_id
        try:
            if path.resolve().parent != self.root.resolve():
                return None
        except OSError:
            return None
        return path if path in self.run_dirs() else None

    def _per_request(self, run_id: str) -> _Cached | None:
        run_dir = self.run_dir(run_id)
        if run_dir is None:
            return None
        hit = self._load(run_dir)
        return hit if hit.partials is not None else None

    def jobs(self, run_id: str) -> tuple[list[str], list[str]] | None:
        """(models, tasks) of a run with per-request rows (None for aggregate-only runs)."""
        hit = self._per_request(run_id)
        if hit is None:
            return None
        return sorted(hit.aggregates["model"].unique()), sorted(hit.aggregates["task"].unique())

    def rows(self, run_id: str, model: str, task: str) -> pd.DataFrame | None:
        """Per-request rows of one (model, task) of a run (None for aggregate-only runs),
        DETAIL_COLUMNS only, read from the part files that hold them."""
        hit = self._per_request(run_id)
        if hit is None:
            return None
        p = hit.partials
        holding = pc.unique(p.filter(pc.and_(pc.equal(p["model"], model), pc.equal(p["task"], task)))[PART_FILE])
        store = RunStore(self.run_dir(run_id))
        job = (ds.field("model") == model) & (ds.field("task") == task)
        try:
            table = store.scan_parts(lambda paths: results_dataset(paths).to_table(columns=DETAIL_COLUMNS, filter=job),
                                     files=[store.results_dir / n for n in holding.to_pylist()])
        except PartsChanged:  # the job's files were compacted meanwhile: read them as they are now
            return self.rows(run_id, model, task)
        return table.to_pandas()

    def power(self, run_id: str, model: str, task: str, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
        """Power samples of one job's GPUs between two times (UTC): host, gpu_index, timestamp, power_w."""
        run_dir = self.run_dir(run_id)
        if run_dir is None:
            return pd.DataFrame(columns=["host", "gpu_index", "timestamp", "power_w"])
        store = RunStore(run_dir)
        utc = pa.timestamp("us", tz="UTC")
        when = ((ds.field("model") == model) & (ds.field("task") == task) & ds.field("power_w").is_valid()
                & (ds.field("timestamp") >= pa.scalar(pd.Timestamp(start).floor("us").to_pydatetime(), utc))
                & (ds.field("timestamp") <= pa.scalar(pd.Timestamp(end).ceil("us").to_pydatetime(), utc)))
        slug = job_slug(model, task)
        files = [p for p in store.power_files() if part_job(p.name) == slug]
        table = store.read_power(filter=when, files=files).select(["host", "gpu_index", "timestamp", "power_w"])
        return table.to_pandas().sort_values("timestamp", kind="stable")

    def prompts(self, run_id: str) -> pd.DataFrame:
        run_dir = self.run_dir(run_id)
        if run_dir is None:
            return pd.DataFrame({"prompt_id": pd.Series(dtype=str), "prompt": pd.Series(dtype=str)})
        return RunStore(run_dir).read_prompts()

    def manifest(self, run_id: str) -> dict:
        """The run's manifest; {} when it has none (or it was damaged and set aside)."""
        run_dir = self.run_dir(run_id)
        return (RunStore(run_dir).read_manifest() or {}) if run_dir is not None else {}

    def set_aside(self) -> dict[str, list[str]]:
        """{run: what the damaged files set aside in its .quarantine/ mean} for the runs that have any."""
        summaries = {d.name: RunStore(d).set_aside_summary() for d in self.run_dirs()}
        return {run: what for run, what in summaries.items() if what}


def pareto_front(x: pd.Series, y: pd.Series) -> pd.Series:
    """True where no other point is at least as good on both (lower x, lower y) and better on one."""
    xs, ys = x.to_numpy(float), y.to_numpy(float)
    on = np.zeros(len(xs), dtype=bool)
    for i in range(len(xs)):
        if np.isnan(xs[i]) or np.isnan(ys[i]):
            continue
        dominated = (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        on[i] = not dominated.any()
    return pd.Series(on, index=x.index)


def verbosity(agg: pd.DataFrame) -> pd.DataFrame:
    """Per (run, gpu, model, backend) and task pair: response length and energy under the
    task and its concise twin, and what the concise prompt saved (percent, rounded to
    0.1). Each row compares one model with itself on one GPU: nothing is summed."""
    keys = ["run_id", "gpu", "model", "backend", "concurrency"]
    out = []
    for base in ("chat", "instruct"):
        concise = f"{base}-concise"
        a = agg[agg["task"] == base].set_index(keys)
        b = agg[agg["task"] == concise].set_index(keys)
        both = a.index.intersection(b.index)
        if both.empty:
            continue
        a, b = a.loc[both], b.loc[both]
        out.append(pd.DataFrame({
            "pair": f"{base} vs {concise}",
            "parameters": a["parameters"],
            "length": a["response_length"].round(1),
            "length concise": b["response_length"].round(1),
            "length saved %": (100 * (1 - b["response_length"] / a["response_length"])).round(1),
            "energy (J)": a["energy"].astype(float).round(1),
            "energy concise (J)": b["energy"].astype(float).round(1),
            "energy saved %": (100 * (1 - b["energy"].astype(float) / a["energy"].astype(float))).round(1),
        }).reset_index())
    if not out:
        return pd.DataFrame()
    return pd.concat(out, ignore_index=True).sort_values(["gpu", "pair", "energy saved %", "length saved %"],
                                                         ascending=[True, True, False, False])
