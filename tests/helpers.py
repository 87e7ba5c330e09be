"""Helpers shared by the tests."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHAREGPT = SHARED / "data" / "sharegpt_v1_sample.json"
MLENERGY = SHARED / "data" / "mlenergy_2023"


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tasks_yaml(tmp_path: Path, tasks=("chat", "instruct"), **generation) -> Path:
    """A tasks.yaml with the shipped system prompts and small generation settings."""
    shipped = yaml.safe_load((ROOT / "tasks.yaml").read_text())
    data = {
        "tasks": [t for t in shipped["tasks"] if t["name"] in tasks],
        "generation": {**shipped["generation"], "max_new_tokens": 16, "warmup_requests": 1, **generation},
        "prompts": {"dataset": "builtin", "num_prompts": 4, "seed": 0},
    }
    return write_yaml(tmp_path / "tasks.yaml", data)


def run_sweep_cli(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweep", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )
