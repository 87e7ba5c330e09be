"""The run directory under damage: names no reader may skip, files cut short or garbage,
log lines that are not rows, whole files fsync'ed into place."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from sweep.store import RunStore, job_slug
from tests.helpers import make_run, synthetic_rows


def test_part_file_names_are_never_hidden_from_dataset_readers():
    names = ["_baseline", "Ωmega", "../../etc", "a name with spaces", "", " ", "._-", ".hidden", "__init__", "-x", "日本語", "a" * 300]
    slugs = {job_slug(n, t) for n in names for t in ("chat", "_t", "...")}
    assert len(slugs) == len(names) * 3
    assert all(s[0].isascii() and s[0].isalnum() for s in slugs), sorted(slugs)
    assert job_slug("tiny-vicuna", "chat") == "tiny-vicuna__chat-da11c561"  # names that worked keep their files


def test_every_reader_sets_a_damaged_file_aside_once(tmp_path, capsys):
    from ui.data import RunsFolder
    from ui.views import set_aside_note

    jobs = [synthetic_rows("r", m, "chat", [1.0, 2.0], [5, 6]) for m in ("a", "b", "c", "d")]
    store = make_run(tmp_path, "r", jobs)
    parts = store.part_files()
    parts[0].write_bytes(parts[0].read_bytes()[:-30])  # cut short
    parts[1].write_bytes(os.urandom(2000))  # garbage
    parts[2].write_bytes(b"")  # 0 bytes
    # read-only (a dry run): left in place, rows not counted
    assert set(RunStore(store.run_dir, read_only=True).done_prompt_ids()) == {("d", "chat")}
    assert all(p.exists() for p in parts)
    capsys.readouterr()
    # the UI reads through the store: the damaged files are set aside, one warning each
    folder = RunsFolder(tmp_path)
    assert list(folder.aggregates()["model"]) == ["d"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("warning: ") and "damaged part file" in line for line in err)
    assert {p.name for p in parts[:3]} == {line.split(": ")[1].rsplit("/", 1)[1] for line in err}
    assert len(store.set_aside_files()) == 3 and not any(p.exists() for p in parts[:3])
    assert len(pd.read_parquet(store.results_dir)) == 2  # pandas reads the folder again
    assert "3 damaged part files: their rows are not counted" in set_aside_note(folder.set_aside())
    # a garbage manifest: the UI keeps the run, the file is set aside
    store.manifest_path.write_bytes(b"\xff{not json")
    assert folder.manifest("r") == {} and [d.name for d in folder.run_dirs()] == ["r"]
    assert len(store.set_aside_files()) == 4
    assert len(folder.rows("r", "d", "chat")) == 2
    # and the page says what that means: rows shown, a resume refused
    assert "1 damaged manifest: the run reads without one (its rows are shown" in set_aside_note(folder.set_aside())
    # a damaged failure record does not stop the report either
    store.failures_dir.joinpath("x.json").write_text("[1, 2")
    assert store.failures() == [] and len(store.set_aside_files()) == 5


def test_whole_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import sweep.store.files as store_mod

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                           real_fsync(fd)))
    monkeypatch.setattr(store_mod.os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                               real_replace(a, b)))
    store = RunStore(tmp_path / "r")
    store.create()
    rows = synthetic_rows("r", "m", "chat", [1.0], [3])
    writes = [lambda: store.write_part(rows, "m__chat-1"), lambda: store.write_manifest({"run_id": "r"}),
              lambda: store.record_failure("m", "chat", "boom")]
    for write in writes:
        events.clear()
        write()
        (_, tmp, final), = [e for e in events if e[0] == "replace"]
        assert events == [("fsync", tmp), ("replace", tmp, final), ("fsync", str(Path(final).parent))]
        assert Path(tmp).name.startswith(".")
    assert not [p for p in store.run_dir.rglob(".*.tmp")]


def test_manifest_is_strict_json():
    from sweep.store import write_json_atomic

    with pytest.raises(ValueError):
        write_json_atomic(Path("/nonexistent/m.json"), {"x": float("inf")})  # refused before any file is made


# -- write-ahead log ----------------------------------------------------------------------

def test_log_lines_that_are_not_rows_are_skipped_and_counted(tmp_path, capsys):
    store = RunStore(tmp_path / "r")
    store.create()
    good = synthetic_rows("r", "m", "chat", [1.0, 2.0], [3, 4])
    bad_type = dict(good[1], response_tokens="many")
    lines = [json.dumps(good[0], default=str).encode(), b"\xff\xfe\x00 not utf-8", b"{}", b"[]", b"1", b"null",
             b'{"model": "m"}', json.dumps(bad_type, default=str).encode(), b"{not json"]
    wal = store.wal_dir / f"{job_slug('m', 'chat')}.jsonl"
    wal.write_bytes(b"\n".join(lines) + b"\n" + json.dumps(good[1], default=str).encode()[:50])  # last line cut off
    assert store.done_prompt_ids() == {("m", "chat"): {"p0"}}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8 line(s) that are not rows skipped" in err[0] and str(wal) in err[0]
    assert store.recover_wal(job_slug("m", "chat"), "m", "chat") == 1
    df = store.read_results()
    assert list(df["prompt_id"]) == ["p0"] and df["started_at"].iloc[0] == good[0]["started_at"]
    assert not wal.exists()
