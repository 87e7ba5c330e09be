import json

import pytest

from sweep.config import PromptSettings
from sweep.prompts import DatasetError, builtin_prompts, load_prompt_set, parse_sharegpt, sample
from tests.helpers import SHAREGPT


def test_builtin_set():
    prompts = builtin_prompts()
    assert 50 <= len(prompts) <= 100
    assert len({p.prompt_id for p in prompts}) == len(prompts)
    assert all(p.text.strip() for p in prompts)


def test_first_human_turn_and_empty_skipped():
    entries = [
        {"id": "a", "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                                      {"from": "gpt", "value": "hello"}, {"from": "human", "value": "later"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "   "}]},
        {"id": "c", "conversations": []},
        {"id": "d", "conversations": [{"from": "gpt", "value": "only a reply"}]},
        {"id": "a", "conversations": [{"from": "human", "value": "same id"}]},
    ]
    prompts, skipped = parse_sharegpt(entries, "x")
    assert [(p.prompt_id, p.text) for p in prompts] == [("a", "hi"), ("d", "only a reply"), ("a#1", "same id")]
    assert skipped == 2


@pytest.mark.parametrize("ids", [["a", "a", "a#1"], ["a#1", "a", "a"], ["a", "a", "a", "a#2", "a#1"],
                                 [1, "1", "1#1", 1]])
def test_repeated_ids_are_renamed_to_ids_no_entry_has(ids):
    entries = [{"id": i, "conversations": [{"from": "human", "value": f"text {n}"}]} for n, i in enumerate(ids)]
    prompts, _ = parse_sharegpt(entries, "x")
    got = [p.prompt_id for p in prompts]
    assert len(set(got)) == len(ids)
    # an id the file itself gives is never taken by a renamed repeat: its own entry keeps it
    for n, i in enumerate(ids):
        if str(i) not in map(str, ids[:n]):
            assert got[n] == str(i)


def test_not_sharegpt_names_the_entry():
    with pytest.raises(DatasetError, match=r"f.json: \[1\].conversations"):
        parse_sharegpt([{"conversations": []}, {"id": "x"}], "f.json")


def test_sampling_is_deterministic_in_the_seed():
    prompts = builtin_prompts()
    a, b, c = sample(prompts, 10, 1), sample(prompts, 10, 1), sample(prompts, 10, 2)
    assert a == b and a != c and len(set(a)) == 10
    assert sample(prompts, 1000, 0) == prompts


@pytest.mark.skipif(not SHAREGPT.is_file(), reason="../shared/data is absent")
def test_real_sharegpt_sample():
    full = load_prompt_set(PromptSettings(dataset=str(SHAREGPT), num_prompts=10**6))
    assert full.available == 2977 and full.skipped_empty == 1 and len(full.prompts) == 2977
    raw = json.loads(SHAREGPT.read_text())
    assert full.prompts[0].prompt_id == raw[0]["id"]
    some = load_prompt_set(PromptSettings(dataset=str(SHAREGPT), num_prompts=100, seed=0))
    again = load_prompt_set(PromptSettings(dataset=str(SHAREGPT), num_prompts=100, seed=0))
    assert some.prompts == again.prompts and len(some.prompts) == 100
