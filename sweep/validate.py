"""Checks over a whole run: is it complete, and can its energy figures be trusted?

Every check is a small pure function of `RunFacts` (what `collect` reads from the run
directory: the plan from the manifest, the stored prompt ids, figures per job and per
worker from `sweep.aggregate`, failures, temperatures) returning `Expectation`s, one per
job or GPU it looked at, as ML.ENERGY's results validation does. `python -m sweep
validate RUN_DIR` prints them; an error-level expectation that fails makes it exit 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from sweep.aggregate import WORKER_KEYS, finish, job_figures, worker_partials
from sweep.quality import FLAGS
from sweep.record import job_key
from sweep.store import RunStore

ERROR, WARNING = "error", "warning"
# Beyond this share of rows with an energy flag, a job's per-row figures are coarse.
FLAGGED_SHARE_MAX = 0.10
# Mean power within this factor of idle: the GPU mostly waits (on Python, the host CPU).
HOST_BOUND_OF_IDLE = 1.15
# Idle power of a GPU: above zero and at most this share of its power limit.
IDLE_OF_LIMIT_MAX = 0.5
# The same GPU model's idle power across workers, and a job's J/token across workers.
IDLE_SPREAD_MAX = 0.25
WORKER_SPREAD_MAX = 0.10
# Hopper and Ampere boards slow their clocks near 85-90 C: figures taken hotter are not comparable.
TEMPERATURE_MAX_C = 85.0
# A job's rows against its reference checks (the same requests in long windows): the median
# deviation above which its energy figures are wrong, and above which they are suspect.
ATTRIBUTION_ERROR = 0.05
ATTRIBUTION_WARNING = 0.02
# A job at concurrency N > 1: how long N requests must be in flight for its energy per token
# to be a steady state, and how close its rows must add up to the counter over the job.
STEADY_WINDOW_MIN_S = 30.0
TOKEN_SHARE_SUM_MAX = 0.01


@dataclass(frozen=True)
class Expectation:
    check: str
    passed: bool
    severity: str  # ERROR or WARNING: what a failure means
    message: str
    model: str | None = None  # the job it is about, where it is about one
    task: str | None = None


@dataclass
class RunFacts:
    planned_jobs: list[tuple[str, str]] | None  # (model, task) of the manifest's plan; None: no plan (plan_note)
    planned_prompts: set[str]
    stored: pd.DataFrame  # per (model, task): rows, distinct_planned, unplanned
    jobs: pd.DataFrame  # figures per KEYS (sweep.aggregate)
    workers: pd.DataFrame  # figures per KEYS + WORKER_KEYS
    failures: list[dict] = field(default_factory=list)
    max_temperature_c: dict[str, float] = field(default_factory=dict)  # "host gpu N" -> highest reading
    plan_note: str | None = None  # why there is no plan
    references: pd.DataFrame = field(default_factory=lambda: reference_frame(pa.table({})))  # see reference_frame
    job_records: list[dict] = field(default_factory=list)  # runs/<id>/jobs/ (RunStore.job_figures)


def _job_name(model: str, task: str) -> str:
    return f"{model} / {task}"


# -- the checks ----------------------------------------------------------------------
def check_complete(f: RunFacts) -> list[Expectation]:
    """Every planned (model, task, prompt) is stored."""
    if f.planned_jobs is None:
        return [Expectation("complete", False, WARNING, f"{f.plan_note}: completeness not checked "
                            f"(--strict makes this an error)")]
    stored = f.stored.set_index(["model", "task"]) if len(f.stored) else None
    out = []
    for model, task in f.planned_jobs:
        have = int(stored.loc[(model, task), "distinct_planned"]) if stored is not None and (model, task) in stored.index else 0
        missing = len(f.planned_prompts) - have
        out.append(Expectation("complete", missing == 0, ERROR,
                               f"{_job_name(model, task)}: {have} of {len(f.planned_prompts)} prompts stored"
                               + (f", {missing} missing (rerun with the same --run-id to finish)" if missing else ""),
                               model, task))
    return out


def check_stored_once(f: RunFacts) -> list[Expectation]:
    """No (model, task, prompt) is stored twice, and no row is of a prompt outside the plan."""
    out = []
    for r in f.stored.itertuples():
        dup = int(r.rows - r.distinct_planned - r.unplanned)
        ok = dup == 0 and r.unplanned == 0
        msg = f"{_job_name(r.model, r.task)}: {r.rows} rows"
        if dup:
            msg += f", {dup} duplicated (the same prompt stored more than once)"
        if r.unplanned:
            msg += f", {int(r.unplanned)} of prompts not in the run's prompts"
        out.append(Expectation("stored_once", ok, ERROR, msg, r.model, r.task))
    return out


def check_energy_present(f: RunFacts) -> list[Expectation]:
    """Every GPU row has an energy reading (or says why not); every CPU row says why it has none."""
    out = []
    for r in f.jobs.itertuples():
        missing, unexplained = int(r.responses - r.measured), int(r.energy_missing)
        if r.gpu == "CPU":
            out.append(Expectation("energy_present", unexplained == 0, ERROR,
                                   f"{_job_name(r.model, r.task)}: {r.responses} CPU rows, {unexplained} without a "
                                   f"reason for the missing energy", r.model, r.task))
            continue
        msg = f"{_job_name(r.model, r.task)} on {r.gpu}: {missing} of {r.responses} GPU rows without energy"
        if unexplained:
            msg += f", {unexplained} without a reason"
        # Rows that say why (a counter reset, a window too short to read) only warn.
        out.append(Expectation("energy_present", missing == 0, ERROR if unexplained else WARNING, msg, r.model, r.task))
    return out


def check_idle_power(f: RunFacts) -> list[Expectation]:
    """Idle power measured, plausible for the GPU (0 < idle <= half its limit), and
    consistent across workers with the same GPU model."""
    w = f.workers[f.workers["measured"] > 0]
    out = []
    for gpu, g in w.groupby("gpu", sort=True):
        per_worker = g.groupby(WORKER_KEYS, dropna=False).agg(idle=("idle_power", "mean"), limit=("power_limit", "mean"))
        idle = per_worker["idle"]
        if idle.isna().any():
            out.append(Expectation("idle_power", False, ERROR, f"{gpu}: idle power not measured on some worker"))
            continue
        limit = per_worker["limit"]
        bad = (idle <= 0) | (limit.notna() & (idle > IDLE_OF_LIMIT_MAX * limit))
        spread = idle.max() / idle.min() - 1 if idle.min() > 0 else np.inf
        out.append(Expectation(
            "idle_power", not bad.any(), ERROR,
            f"{gpu}: idle {idle.min():.0f}-{idle.max():.0f} W on {len(idle)} GPU(s)"
            + (f", limit {limit.max():.0f} W" if limit.notna().any() else "")
            + (f"; implausible (must be above 0 and at most {IDLE_OF_LIMIT_MAX:g} x the limit)" if bad.any() else "")))
        if len(idle) > 1:
            out.append(Expectation("idle_power_spread", spread <= IDLE_SPREAD_MAX, WARNING,
                                   f"{gpu}: idle power differs by {spread:.0%} across {len(idle)} GPUs "
                                   f"(at most {IDLE_SPREAD_MAX:.0%})"))
    return out


def check_flagged_share(f: RunFacts) -> list[Expectation]:
    """Few rows of a job have an energy quality flag (coarse window, zero counter, reset, power out of bounds)."""
    out = []
    for r in f.jobs[f.jobs["measured"] > 0].itertuples():
        ok = r.flagged_share <= FLAGGED_SHARE_MAX
        name = _job_name(r.model, job_key(r.task, r.concurrency))
        msg = f"{name} on {r.gpu}: {r.flagged_share:.0%} of measured rows flagged"
        if r.coarse_share > 0:
            msg += f" ({r.coarse_share:.0%} with windows under 1 s: {FLAGS['coarse_window'].split(': ')[1]})"
        out.append(Expectation("flagged_share", ok, WARNING, msg + ("" if ok else f"; at most {FLAGGED_SHARE_MAX:.0%}"),
                               r.model, job_key(r.task, r.concurrency)))
    return out


def check_gpu_busy(f: RunFacts) -> list[Expectation]:
    """The GPU works during requests: mean power well above idle."""
    out = []
    # Rows written before mean_power_w existed have none: nothing to judge.
    # A row's power at concurrency > 1 is its share of the GPU's: not comparable with idle.
    known = (f.jobs["measured"] > 0) & f.jobs["idle_power"].notna() & f.jobs["mean_power"].notna() \
        & (f.jobs["concurrency"] == 1)
    for r in f.jobs[known].itertuples():
        ratio = r.mean_power / r.idle_power
        ok = ratio > HOST_BOUND_OF_IDLE
        out.append(Expectation("gpu_busy", ok, WARNING,
                               f"{_job_name(r.model, r.task)} on {r.gpu}: mean power {r.mean_power:.0f} W, "
                               f"{ratio:.2f} x idle" + ("" if ok else " (the GPU waits on the host: a compiled "
                                                                       "backend measures the model, not Python)"),
                               r.model, r.task))
    return out


def check_worker_spread(f: RunFacts) -> list[Expectation]:
    """The same job on the same GPU model gives the same J/token on every worker."""
    out = []
    w = f.workers[f.workers["measured"] > 0]
    for (gpu, model, backend, task), g in w.groupby(["gpu", "model", "backend", "task"], sort=True):
        if len(g) < 2:
            continue
        ept = g["energy_per_token"]
        spread = ept.max() / ept.min() - 1 if ept.min() > 0 else np.inf
        out.append(Expectation("worker_spread", spread <= WORKER_SPREAD_MAX, WARNING,
                               f"{_job_name(model, task)} ({backend}) on {gpu}: J/token differs by {spread:.0%} "
                               f"across {len(g)} workers (at most {WORKER_SPREAD_MAX:.0%})", model, task))
    return out


def check_no_failed_jobs(f: RunFacts) -> list[Expectation]:
    """No job failed."""
    if not f.failures:
        return [Expectation("no_failed_jobs", True, ERROR, "no failed job")]
    return [Expectation("no_failed_jobs", False, ERROR,
                        f"{_job_name(x['model'], x['task'])} failed: {x['error'].splitlines()[0][:200]}",
                        x["model"], x["task"]) for x in f.failures]


def check_temperature(f: RunFacts) -> list[Expectation]:
    """No GPU ran hot enough to slow its clocks (from the power timeline's temperatures)."""
    return [Expectation("temperature", t < TEMPERATURE_MAX_C, WARNING,
                        f"{gpu}: highest temperature {t:.0f} C (below {TEMPERATURE_MAX_C:.0f} C)")
            for gpu, t in sorted(f.max_temperature_c.items())]


def check_attribution(f: RunFacts) -> list[Expectation]:
    """Each job's stored energy agrees with its reference checks: the same requests, the
    same seeds, repeated inside long windows (median deviation at most 2%; above 5% an error)."""
    out = []
    refs = f.references
    for (model, task), g in refs.groupby(["model", "task"], sort=True):
        usable = g[g["energy_j"].notna() & g["row_energy_j"].notna() & g["same_tokens"]]
        name = _job_name(model, task)
        if usable.empty:
            why = "; ".join(sorted(set(g["why_unusable"].dropna()))) or "none usable"
            out.append(Expectation("attribution", False, WARNING, f"{name}: {len(g)} reference check(s), none usable "
                                   f"({why})", model, task))
            continue
        dev = (usable["row_energy_j"] / usable["energy_j"] - 1.0).abs()
        med = float(dev.median())
        severity = ERROR if med > ATTRIBUTION_ERROR else WARNING
        ok = med <= ATTRIBUTION_WARNING
        cost = f"; they took {g['cost_s'].sum():.0f} s" + (f", {g['cost_share'].iloc[0]:.1%} of the job's GPU time"
                                                          if pd.notna(g["cost_share"].iloc[0]) else "")
        out.append(Expectation("attribution", ok, severity,
                               f"{name}: stored energy vs {len(usable)} reference check(s): median deviation "
                               f"{med:.1%}, largest {dev.max():.1%} (at most {ATTRIBUTION_WARNING:.0%}; above "
                               f"{ATTRIBUTION_ERROR:.0%} an error){cost}", model, task))
    return out


def check_steady_window(f: RunFacts) -> list[Expectation]:
    """Each job at concurrency N > 1 had N requests in flight for at least 30 s (its energy per
    token is a steady state), and its rows add up to the counter over the job (within 1%)."""
    out = []
    for record in f.job_records:
        model, task = record["model"], record["task"]
        for i, s in enumerate(record["sessions"]):
            name = _job_name(model, task) + (f" (session {i + 1})" if len(record["sessions"]) > 1 else "")
            window = s.get("steady_window_s")
            if window is None:
                out.append(Expectation("steady_window", False, WARNING, f"{name}: no steady window ({s.get('note')})",
                                       model, task))
                continue
            ok = window >= STEADY_WINDOW_MIN_S
            why = "" if ok else (f"; too few prompts for concurrency {s.get('concurrency')}: its energy per token is "
                                 f"not a steady state's (more prompts lengthen it)")
            out.append(Expectation("steady_window", ok, WARNING,
                                   f"{name}: {s.get('concurrency')} requests in flight for {window:.1f} s (at least "
                                   f"{STEADY_WINDOW_MIN_S:.0f} s){why}", model, task))
            counter, rows = s.get("counter_energy_j"), s.get("rows_energy_j")
            if counter:
                dev = rows / counter - 1.0
                out.append(Expectation("token_share_sum", abs(dev) <= TOKEN_SHARE_SUM_MAX, ERROR,
                                       f"{name}: rows sum to {rows:.1f} J, the counter over the job {counter:.1f} J "
                                       f"({dev:+.2%}; at most {TOKEN_SHARE_SUM_MAX:.0%})", model, task))
    return out


CHECKS = [check_complete, check_stored_once, check_energy_present, check_idle_power, check_flagged_share,
          check_gpu_busy, check_worker_spread, check_no_failed_jobs, check_temperature, check_attribution,
          check_steady_window]


def run_checks(facts: RunFacts) -> list[Expectation]:
    return [e for check in CHECKS for e in check(facts)]


# -- reading a run -------------------------------------------------------------------
def _planned_jobs(manifest: dict | None) -> tuple[list[tuple[str, str]] | None, str | None]:
    """((model, task) of the run's plan: the manifest's models x tasks, limited to the tasks
    its sessions asked for (`--task`), None), or (None, why) when there is no plan to read."""
    from pydantic import ValidationError

    from sweep.config import ModelsFile, TasksFile
    from sweep.plan import make_plan

    if not manifest:
        return None, "the run has no manifest (missing, or set aside as damaged)"
    if "models" not in manifest or "tasks" not in manifest:
        return None, "the manifest names no models or tasks"
    try:
        models = ModelsFile.model_validate({"models": manifest["models"]})
        tasks = TasksFile.model_validate(manifest["tasks"])
    except (ValidationError, TypeError):  # written by another version of sweep
        return None, "the manifest's models or tasks cannot be read by this version of sweep"
    sessions = [s for s in manifest.get("sessions", []) if isinstance(s, dict)]
    if sessions and all(isinstance(s.get("tasks"), list) for s in sessions):
        asked = {t for s in sessions for t in s["tasks"]}
        return [(j.model, j.key) for j in make_plan(models, tasks) if j.task in asked], None
    return [(j.model, j.key) for j in make_plan(models, tasks)], None


def stored_counts(ids: pa.Table, planned_prompts: set[str]) -> pd.DataFrame:
    """Per (model, task): rows, distinct planned prompt ids, rows of prompts outside the plan."""
    import pyarrow.compute as pc

    planned = pc.is_in(ids["prompt_id"], pa.array(sorted(planned_prompts), pa.string()))
    ids = ids.append_column("planned", pc.cast(planned, pa.int64()))
    rows = ids.group_by(["model", "task"], use_threads=False).aggregate([([], "count_all"), ("planned", "sum")])
    distinct = (ids.filter(planned).group_by(["model", "task"], use_threads=False)
                .aggregate([("prompt_id", "count_distinct")]))
    df = rows.to_pandas().merge(distinct.to_pandas(), on=["model", "task"], how="left").fillna({"prompt_id_count_distinct": 0})
    return pd.DataFrame({"model": df["model"], "task": df["task"], "rows": df["count_all"].astype(int),
                         "distinct_planned": df["prompt_id_count_distinct"].astype(int),
                         "unplanned": (df["count_all"] - df["planned_sum"]).astype(int)}).sort_values(["model", "task"])


def temperatures(store: RunStore, seen: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Highest temperature per GPU ("host GPU n") in the run's power timeline. `seen`
    (power file name -> its maxima) is filled in and reused: a live view reads each file once."""
    seen = {} if seen is None else seen
    paths = store.power_files()
    for gone in set(seen) - {p.name for p in paths}:
        del seen[gone]
    for path in paths:
        if path.name in seen:
            continue
        df = store.read_power(files=[path]).select(["host", "gpu_index", "temperature_c"]).to_pandas()
        df = df.dropna(subset=["temperature_c"])
        seen[path.name] = {f"{h} GPU {i}": float(t)
                           for (h, i), t in df.groupby(["host", "gpu_index"])["temperature_c"].max().items()}
    out: dict[str, float] = {}
    for maxima in seen.values():
        for gpu, t in maxima.items():
            out[gpu] = max(t, out.get(gpu, t))
    return out


def facts(manifest: dict | None, planned_prompts: set[str], parts: pa.Table, stored: pd.DataFrame,
          failures: list[dict], max_temperature_c: dict[str, float], jobs: pd.DataFrame | None = None,
          references: pd.DataFrame | None = None, job_records: list[dict] | None = None) -> RunFacts:
    """RunFacts from what a reader already has: partials by worker (sweep.aggregate),
    `stored_counts` of the row ids, the job figures when it made them already, and the
    reference checks (`reference_facts`)."""
    planned, why = _planned_jobs(manifest)
    jobs = job_figures(parts) if jobs is None else jobs
    refs = reference_frame(pa.table({})) if references is None else references
    if len(refs) and len(jobs):
        one = jobs[jobs["concurrency"] == 1]  # the checks are of one-at-a-time jobs
        gpu_time = (one["latency"] * one["responses"]).groupby([one["model"], one["task"]]).sum()
        cost = refs.groupby(["model", "task"])["cost_s"].transform("sum")
        key = pd.MultiIndex.from_frame(refs[["model", "task"]])
        refs = refs.assign(cost_share=(cost / gpu_time.reindex(key).to_numpy()).to_numpy())
    return RunFacts(planned, planned_prompts, stored, jobs, finish(parts, WORKER_KEYS), failures, max_temperature_c,
                    why, refs, job_records or [])


REFERENCE_COLUMNS = ["model", "task", "prompt_id", "energy_j", "row_energy_j", "row_method", "same_tokens",
                     "why_unusable", "repeats", "window_s", "cost_s", "cost_share"]


def reference_frame(checks: pa.Table, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Reference checks joined with the rows of their requests: REFERENCE_COLUMNS."""
    if checks.num_rows == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in REFERENCE_COLUMNS})
    refs = checks.to_pandas()
    rows = rows if rows is not None else pd.DataFrame(columns=["model", "task", "prompt_id", "energy_j",
                                                               "energy_method", "response_tokens"])
    rows = rows.rename(columns={"energy_j": "row_energy_j", "energy_method": "row_method",
                                "response_tokens": "row_tokens"})
    refs = refs.merge(rows.drop_duplicates(["model", "task", "prompt_id"]), on=["model", "task", "prompt_id"],
                      how="left")
    same = [isinstance(t, (list, np.ndarray)) and len(t) > 0 and pd.notna(r) and all(int(x) == int(r) for x in t)
            for t, r in zip(refs["response_tokens"], refs["row_tokens"])]
    refs["same_tokens"] = same
    refs["why_unusable"] = np.where(refs["energy_j"].isna(), refs["energy_note"].fillna("no reference energy"),
                                    np.where(refs["row_energy_j"].isna(), "its row has no energy",
                                             np.where(~refs["same_tokens"], "the repeats' tokens differ from the row's",
                                                      None)))
    refs["cost_share"] = np.nan
    return refs[REFERENCE_COLUMNS]


def reference_facts(store: RunStore) -> pd.DataFrame:
    """The run's reference checks with the rows they check (read for those prompts only)."""
    checks = store.read_references()
    if checks.num_rows == 0:
        return reference_frame(checks)
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    wanted = pc.unique(checks["prompt_id"])
    rows = store.read_parts(columns=["model", "task", "prompt_id", "energy_j", "energy_method", "response_tokens"],
                            filter=ds.field("prompt_id").isin(wanted)).to_pandas()
    return reference_frame(checks, rows)


def collect(store: RunStore) -> RunFacts:
    """What the checks need, read from the run directory (the columns they use only)."""
    planned_prompts = set(store.read_prompts()["prompt_id"])
    parts, ids = store.scan_parts(lambda paths: worker_partials(tuple(paths), store.run_dir.name))
    return facts(store.read_manifest(), planned_prompts, parts, stored_counts(ids, planned_prompts), store.failures(),
                 temperatures(store), references=reference_facts(store), job_records=store.job_figures())


def validate(store: RunStore) -> list[Expectation]:
    return run_checks(collect(store))


def job_status(expectations: list[Expectation]) -> pd.DataFrame:
    """Per (model, task): "ok", "warning" or "error" (the worst failed check about it), and
    what failed (`validation_detail`: each failed check's name and message, worst first)."""
    rank = {"ok": 0, WARNING: 1, ERROR: 2}
    worst: dict[tuple[str, str], str] = {}
    failed: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for e in expectations:
        if e.model is None:
            continue
        key = (e.model, e.task)
        level = "ok" if e.passed else e.severity
        if rank[level] >= rank[worst.get(key, "ok")]:
            worst[key] = level
        if not e.passed:
            what = e.message.split(": ", 1)[-1] if e.message.startswith(f"{e.model} / {e.task}") else e.message
            failed.setdefault(key, []).append((-rank[e.severity], f"{e.check}: {what}"))
    return pd.DataFrame([{"model": m, "task": t, "validation": s,
                          "validation_detail": "; ".join(x for _, x in sorted(failed.get((m, t), []))) or None}
                         for (m, t), s in worst.items()], columns=["model", "task", "validation", "validation_detail"])


def as_records(expectations: list[Expectation]) -> list[dict]:
    return [asdict(e) for e in expectations]


def failed_run(expectations: list[Expectation], strict: bool = False) -> bool:
    """Whether a run fails validation: an error-level check failed (any check, `strict`)."""
    return any(not e.passed and (strict or e.severity == ERROR) for e in expectations)


def print_table(expectations: list[Expectation], strict: bool = False) -> None:
    """Failures in full, then a line per check with how many passed."""
    failed = [e for e in expectations if not e.passed]
    for e in sorted(failed, key=lambda e: (e.severity != ERROR, e.check)):
        print(f"{e.severity.upper():8} {e.check:18} {e.message}")
    print()
    by_check: dict[str, list[Expectation]] = {}
    for e in expectations:
        by_check.setdefault(e.check, []).append(e)
    for name, es in by_check.items():
        ok = sum(e.passed for e in es)
        mark = "ok" if ok == len(es) else next(e.severity for e in es if not e.passed)
        print(f"{mark:8} {name:18} {ok}/{len(es)} passed")
    errors = sum(1 for e in failed if e.severity == ERROR)
    verdict = "FAILED" if failed_run(expectations, strict) else "PASSED"
    print(f"\n{verdict}: {errors} error(s), {len(failed) - errors} warning(s)" + (" (--strict: warnings fail)" if strict else ""))

