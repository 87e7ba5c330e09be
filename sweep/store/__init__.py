"""The run directory: manifest, per-request Parquet dataset, write-ahead log, failures.

The package: `files` (atomic writes, strict JSON), `parts` (a folder of part files: names,
what a reader sees, the one merge), `wal` (the write-ahead log and the JobWriter), `locks`,
`quarantine` (damaged files set aside), and `run.RunStore`, which holds them together.

    runs/<run_id>/manifest.json        config snapshot, versions, GPUs, host, times
    runs/<run_id>/prompts.parquet      prompt_id -> prompt text, for every prompt of the run
    runs/<run_id>/results/*.parquet    one row per request (the dataset)
    runs/<run_id>/wal/<job>.jsonl      rows not yet in a part file (crash safety)
    runs/<run_id>/power/*.parquet      power timeline of each worker's GPUs (sweep/meters/timeline.py)
    runs/<run_id>/references/*.parquet each job's reference checks (sweep/measure.py, REFERENCE_SCHEMA)
    runs/<run_id>/servers/<job>.log    what a serving engine the worker started wrote (backend server)
    runs/<run_id>/failures/<job>.json  jobs that failed, with their error
    runs/<run_id>/locks/<job>.lock     held by the one process writing a job (the session's writer)
    runs/<run_id>/locks/driver.lock    held by the one driver writing the run
    runs/<run_id>/.quarantine/         damaged files, set aside where no reader trips on them

Crash safety: every finished request is appended to its job's write-ahead log and
fsync'ed, at most one request later; rows reach Parquet in batches. Part files,
the manifest and the other whole files are written under a dot-name, fsync'ed, renamed
into place and the folder fsync'ed (`atomic_write`): readers never see half a file, and
a power loss leaves the old file or the new one, never an empty one. When a job starts
again, rows left in its log that are not yet in the dataset are written first. So a
crash loses at most the requests in flight (the one being served and the last row not
yet acknowledged: a resume runs both again), and no (model, task, prompt_id) is ever
stored twice.

Damage (a disk error, a file cut short by hand): every read of the dataset goes through
`RunStore.scan_parts`, which moves a part file it cannot read into `.quarantine/` with
one warning line; its rows then count as not stored, so a resume measures them again.
A manifest that is not a JSON object is set aside the same way. Log lines that are not
rows are skipped and counted.

Compaction: when a job ends, its part files (64 rows each) are merged into one
`<slug>-<time>-<hex>.merged.parquet` that names, in its Parquet key-value metadata
(`sweep:replaces`), every file it replaces. Steps: the merged file is written with
`atomic_write` (durable before anything is removed), then the replaced files are removed.
A reader (`part_files`) leaves out every file a merged file in the folder names, so at
every instant (after a crash at any step too, before anything is cleaned up) each row is
read exactly once: before the rename the merged file does not exist, after it the small
files are hidden whether or not they are gone yet. Leftovers are removed by the next
compaction of the job (at its next close, at the start of a session, `sweep compact`).
A merged file lists everything of its job it covers, earlier merged files and their
leftovers included, so files can be removed in any order.
Chosen over swapping per-job directories (RENAME_EXCHANGE): the folder layout, the names
of older runs' files and every reader stay as they were, no filesystem-specific call is
needed, and the file describes itself. The cost: a reader that does not honour the list
(pandas, pyarrow on the folder) sees a job's rows twice from the merged file's rename
until the small files are removed (milliseconds, or until the next compaction after a
crash in between).
"""


from sweep.record import POWER_SCHEMA, REFERENCE_SCHEMA, RESULT_SCHEMA
from sweep.store.files import atomic_write, is_disk_full, strict_json, write_json_atomic
from sweep.store.locks import DRIVER_LOCK, RunBusy
from sweep.store.parts import MERGED_SUFFIX, REPLACES_KEY, SCAN_DEADLINE_S, PartsChanged, job_slug, part_job
from sweep.store.quarantine import QUARANTINE
from sweep.store.run import RunStore
from sweep.store.wal import FLUSH_ROWS, FLUSH_SECONDS, JobWriter, read_wal

__all__ = ["DRIVER_LOCK", "FLUSH_ROWS", "FLUSH_SECONDS", "MERGED_SUFFIX", "POWER_SCHEMA", "QUARANTINE",
           "REFERENCE_SCHEMA", "REPLACES_KEY", "RESULT_SCHEMA", "SCAN_DEADLINE_S", "JobWriter", "PartsChanged",
           "RunBusy", "RunStore", "atomic_write", "is_disk_full", "job_slug", "part_job", "read_wal", "strict_json",
           "write_json_atomic"]
