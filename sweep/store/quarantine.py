"""Damaged files set aside in a run's .quarantine/, where no reader trips on them, and what
each kind set aside means for the run."""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from pathlib import Path

from sweep.logs import warn

QUARANTINE = ".quarantine"

# A file set aside is named <time>-<hex>-<where it was>: its folder and name, "~"-joined.
_ORIGINS = (("part", lambda o: o.startswith("results~")), ("power", lambda o: o.startswith("power~")),
            ("reference", lambda o: o.startswith("references~")),
            ("manifest", lambda o: o == "manifest.json"), ("prompts", lambda o: o == "prompts.parquet"),
            ("failure", lambda o: o.startswith("failures~")), ("job", lambda o: o.startswith("jobs~")),
            ("imported", lambda o: o == "aggregates.parquet"))
_CONSEQUENCES = {
    "part": "damaged part file{s}: their rows are not counted, and a resume measures them again",
    "power": "damaged power file{s}: those power samples are not shown; energy figures are unaffected",
    "reference": "damaged reference checks file{s}: those checks are not counted",
    "manifest": "damaged manifest{s}: the run reads without one (its rows are shown, completeness is not "
                "checked), and a resume is refused until a manifest is put back",
    "prompts": "damaged prompts file{s}: prompt texts are not shown; a resume writes them again",
    "failure": "damaged failure record{s}: not listed as failed",
    "job": "damaged job figures file{s}: those jobs' steady windows are not shown or checked",
    "imported": "damaged imported aggregates: the run shows no figures until it is imported again",
    "other": "damaged file{s}",
}


def _origin(path: Path, run_dir: Path) -> str:
    try:
        return "~".join(path.relative_to(run_dir).parts)
    except ValueError:
        return path.name


class Quarantine:
    """A run's damaged files. `read_only` (a dry run) moves nothing: a damaged file is
    remembered (`damaged`) and left out with a warning."""

    def __init__(self, run_dir: Path, read_only: bool = False) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / QUARANTINE
        self.read_only = read_only
        self.damaged: set[Path] = set()  # found damaged but left in place (read_only)

    def set_aside(self, path: Path, what: str) -> None:
        """Move a damaged file into .quarantine/ (kept for inspection, out of every
        reader's way), with one warning line naming it."""
        if self.read_only:
            self.damaged.add(path)
            warn(f"{path}: {what}; left out (a run without --dry-run moves it to {self.folder})")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        dest = self.folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}-{_origin(path, self.run_dir)}"
        try:
            os.replace(path, dest)
        except FileNotFoundError:  # another reader set it aside first
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # results/ (or power/) on another filesystem than the run folder: copy, then remove.
            try:
                shutil.copy2(path, dest)
            except FileNotFoundError:
                return
            path.unlink(missing_ok=True)
        warn(f"{path}: {what}; moved to {dest}")

    def files(self) -> list[Path]:
        """Files set aside, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def summary(self) -> list[str]:
        """What the files set aside mean for the run, one phrase per kind of file."""
        kinds: dict[str, int] = {}
        for path in self.files():
            origin = path.name.split("-", 2)[-1]
            kind = next((k for k, test in _ORIGINS if test(origin)), "other")
            kinds[kind] = kinds.get(kind, 0) + 1
        return [f"{n} {_CONSEQUENCES[k].format(s='' if n == 1 else 's')}" for k, n in kinds.items()]
