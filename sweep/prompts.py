"""Prompt sets: ShareGPT-format JSON files and the built-in offline set.

A ShareGPT file is a list of `{id, conversations: [{from, value}, ...]}`. The prompt of
an entry is its first human turn (the first turn of any role where there is no human
one, as the 2023 leaderboard took the first turn). Empty prompts are skipped and
counted. Sampling is deterministic in the seed, so every model of a run sees the same
prompts, and a resumed run the same ones again.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sweep.config import BUILTIN_DATASET, PromptSettings


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[Prompt, ...]
    source: str
    available: int  # usable prompts in the source before sampling
    skipped_empty: int


class DatasetError(ValueError):
    """The prompt file is not ShareGPT-shaped; the message names the entry."""


def parse_sharegpt(entries: object, source: str) -> tuple[list[Prompt], int]:
    """Return (prompts, number of empty prompts skipped)."""
    if not isinstance(entries, list):
        raise DatasetError(f"{source}: expected a JSON list of conversations")
    # Ids key the results. The first entry with an id keeps it; a repeat becomes
    # "<id>#<n>" with the smallest n that no entry of the file has or got.
    given = {str(e.get("id", i)) for i, e in enumerate(entries) if isinstance(e, dict)}
    taken: set[str] = set()
    prompts: list[Prompt] = []
    skipped = 0
    for i, entry in enumerate(entries):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            raise DatasetError(f"{source}: [{i}].conversations: missing or not a list")
        human = [t for t in turns if isinstance(t, dict) and t.get("from") == "human"]
        first = human[0] if human else (turns[0] if turns and isinstance(turns[0], dict) else {})
        text = first.get("value") or ""
        if not isinstance(text, str) or not text.strip():
            skipped += 1
            continue
        pid = str(entry.get("id", i))
        try:  # JSON escapes can spell lone surrogates, which no file or tokenizer takes
            (text + pid).encode("utf-8")
        except UnicodeEncodeError:
            raise DatasetError(f"{source}: [{i}]: not valid Unicode (a lone surrogate escape)") from None
        if pid in taken:
            n = 1
            while f"{pid}#{n}" in taken or f"{pid}#{n}" in given:
                n += 1
            pid = f"{pid}#{n}"
        taken.add(pid)
        prompts.append(Prompt(pid, text))
    return prompts, skipped


def builtin_prompts() -> list[Prompt]:
    raw = resources.files("sweep").joinpath("data/builtin_prompts.json").read_text()
    return parse_sharegpt(json.loads(raw), "builtin")[0]


def load_prompt_set(settings: PromptSettings) -> PromptSet:
    if settings.dataset == BUILTIN_DATASET:
        prompts, skipped, source = builtin_prompts(), 0, BUILTIN_DATASET
    else:
        path = Path(settings.dataset)
        try:
            entries = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not valid JSON (line {exc.lineno})") from None
        except RecursionError:
            raise DatasetError(f"{path}: nested too deeply") from None
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
        prompts, skipped = parse_sharegpt(entries, str(path))
        source = str(path)
        if not prompts:
            raise DatasetError(f"{path}: no usable prompts ({len(entries)} entries, {skipped} with an empty prompt)")
    return PromptSet(
        prompts=tuple(sample(prompts, settings.num_prompts, settings.seed)),
        source=source,
        available=len(prompts),
        skipped_empty=skipped,
    )


def sample(prompts: list[Prompt], n: int, seed: int) -> list[Prompt]:
    """n prompts drawn without replacement by `seed`; all of them (in file order) if n >= len."""
    if n >= len(prompts):
        return list(prompts)
    return random.Random(seed).sample(prompts, n)
