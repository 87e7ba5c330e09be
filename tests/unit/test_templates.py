"""Prompts are built with the model's own role tokens and the task's system prompt."""

import pytest
from transformers import AutoTokenizer

from sweep.checkpoints import ensure_random_checkpoint
from sweep.templates import resolve

SYSTEM = "Below is an instruction that describes a task."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_random_checkpoint("random:llama-tiny"))


def test_vicuna(tokenizer):
    t = resolve("lmsys/vicuna-7b-v1.5", None, tokenizer)
    assert t.name == "fastchat:vicuna_v1.1"
    assert t.render(SYSTEM, "Hi there") == f"{SYSTEM} USER: Hi there ASSISTANT:"
    assert tokenizer.eos_token_id in t.stop_token_ids


def test_llama2(tokenizer):
    t = resolve("meta-llama/Llama-2-7b-chat-hf", None, tokenizer)
    assert t.name == "fastchat:llama-2"
    assert t.render(SYSTEM, "Hi there") == f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nHi there [/INST]"


def test_explicit_template_wins(tokenizer):
    t = resolve("random:llama-tiny", "vicuna_v1.1", tokenizer)
    assert t.name == "fastchat:vicuna_v1.1" and t.add_special_tokens


def test_stop_strings_of_the_template(tokenizer):
    t = resolve("x", "one_shot", tokenizer)
    assert t.stop_strings == ("###",)


def test_unknown_model_uses_the_tokenizer_template(tokenizer):
    # FastChat would fall back to its canned one_shot example for Llama-3, Gemma and unknown names.
    for path in ("meta-llama/Meta-Llama-3-8B-Instruct", "some-org/unknown-model"):
        t = resolve(path, None, tokenizer)
        assert t.name == "tokenizer" and not t.add_special_tokens
        text = t.render(SYSTEM, "Hi there")
        assert text == f"<s><|system|>\n{SYSTEM}</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
