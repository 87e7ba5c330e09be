"""Generation backends on CPU: the compiled backend's loop (uncompiled here) against HF.

On CPU the `compiled` backend runs the very loop it compiles and captures on a GPU, so
greedy output must be token-identical to HF `generate`, endings must mean the same, and
the sampling pieces must match HF's logits processors.
"""

import dataclasses

import pytest
import torch

from sweep.backends import BACKENDS, backend_class, load_backend
from sweep.backends.base import BackendError
from sweep.backends.sampling import penalize_repetition, sample, top_p_mask
from sweep.checkpoints import ensure_random_checkpoint
from sweep.config import GenerationSettings, ModelSpec
from sweep.prompts import builtin_prompts

SYSTEM = "A chat between a human user and an artificial intelligence assistant."
PROMPTS = [p.text for p in builtin_prompts()[:4]]


def _load(backend, path="random:llama-tiny", template="vicuna_v1.1", **generation):
    settings = GenerationSettings(**{"max_new_tokens": 40, "context_length": 512, **generation})
    spec = ModelSpec(name="m", path=path, conv_template=template, backend=backend)
    return load_backend(spec, settings, "cpu")


def _tiny_checkpoint(tmp_path, model_type, **extra):
    """A tiny random model of another family, with the offline tokenizer of llama-tiny."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_random_checkpoint("random:llama-tiny"))
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    path = tmp_path / model_type
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_every_registered_backend_loads_by_name():
    assert set(BACKENDS) == {"transformers", "compiled", "server"}
    for name in BACKENDS:
        assert backend_class(name).name == name


@pytest.mark.parametrize("path,template,penalty", [("random:llama-tiny", "vicuna_v1.1", 1.0),
                                                   ("random:llama-small", "llama-2", 1.0),
                                                   ("random:llama-tiny", "vicuna_v1.1", 1.3)])
def test_greedy_output_is_token_identical_to_hf_generate(path, template, penalty):
    # The prompt is padded to its bucket and each step attends over a bucket of the
    # cache (llama-tiny has grouped KV heads, folded in the step): none of it may show.
    hf = _load("transformers", path, template, temperature=0, repetition_penalty=penalty)
    ours = _load("compiled", path, template, temperature=0, repetition_penalty=penalty)
    assert len(ours.kv_buckets) > 1 and len(ours.prompt_buckets) > 1
    for text in PROMPTS:
        a, b = hf.generate(SYSTEM, text, seed=1), ours.generate(SYSTEM, text, seed=1)
        assert (b.response, b.response_tokens, b.stop_reason, b.prompt_tokens) == \
               (a.response, a.response_tokens, a.stop_reason, a.prompt_tokens)
        assert b.steps_past_stop == 0 and 0 < b.ttft_s <= b.latency_s


def test_two_compiled_backends_in_one_process_keep_their_own_attention():
    """Each backend owns its attention options (the decode op reads them by handle): a
    second load with other attention lengths leaves the first one's output unchanged, and
    its decode variant (the attention length a request ran) is its own."""
    hf = _load("transformers", temperature=0)
    first = _load("compiled", temperature=0)
    before = [first.generate(SYSTEM, t, seed=1) for t in PROMPTS[:2]]
    second = _load("compiled", temperature=0, context_length=256, max_new_tokens=24)
    assert first.attention is not second.attention and first.attention.handle != second.attention.handle
    assert first.model.config._attn_implementation != second.model.config._attn_implementation
    second.generate(SYSTEM, PROMPTS[0], seed=1)
    for text, b in zip(PROMPTS[:2], before):
        again, want = first.generate(SYSTEM, text, seed=1), hf.generate(SYSTEM, text, seed=1)
        assert again.response == b.response == want.response
        assert again.decode_variant == b.decode_variant in first.kv_buckets
    assert first.attention.kv_len in first.kv_buckets and second.attention.kv_len in second.kv_buckets


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {}), ("qwen2", {}), ("gemma", {"head_dim": 16}), ("gemma2", {"head_dim": 16, "sliding_window": 512}),
])
def test_other_families_with_a_static_cache_match_hf(tmp_path, model_type, extra):
    path = _tiny_checkpoint(tmp_path, model_type, **extra)
    hf = _load("transformers", path, temperature=0)
    ours = _load("compiled", path, temperature=0)
    for text in PROMPTS[:2]:
        a, b = hf.generate(SYSTEM, text, seed=1), ours.generate(SYSTEM, text, seed=1)
        assert (b.response, b.response_tokens, b.stop_reason) == (a.response, a.response_tokens, a.stop_reason)


def test_a_model_without_static_cache_support_fails_at_load_with_a_clear_error(tmp_path):
    path = _tiny_checkpoint(tmp_path, "gpt_neo", attention_types=[[["global"], 2]], num_layers=2,
                            window_size=256)
    with pytest.raises(BackendError, match="GPTNeoForCausalLM does not support a static KV cache.*backend: transformers"):
        _load("compiled", path, temperature=0)
    assert _load("transformers", path, temperature=0).generate(SYSTEM, "hi", seed=0).response_tokens > 0


def test_a_sliding_window_shorter_than_the_context_is_refused(tmp_path):
    path = _tiny_checkpoint(tmp_path, "gemma2", head_dim=16, sliding_window=128)
    with pytest.raises(BackendError, match="sliding-window attention \\(128 positions\\)"):
        _load("compiled", path)


@pytest.mark.parametrize("backend", ["transformers", "compiled"])  # the server backend: test_server_backend.py
def test_context_beyond_the_models_positions_fails_at_load(backend):
    # llama-tiny has 4096 positions
    with pytest.raises(BackendError, match="context_length 8192 .* exceeds the 4096 positions"):
        _load(backend, context_length=8192, max_new_tokens=6000)


def test_rows_record_the_cache_that_was_used_not_the_one_asked_for():
    hf = _load("transformers", cache_implementation="static")
    ours = _load("compiled", cache_implementation="dynamic")
    assert (hf.effective.cache_implementation, hf.effective.compiled) == ("dynamic", False)  # CPU: HF static is GPU-only
    assert (ours.effective.cache_implementation, ours.effective.compiled) == ("static", False)  # CPU: not compiled


def test_a_seed_reproduces_a_sampled_response_exactly():
    be = _load("compiled", temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    a, b, c = (be.generate(SYSTEM, PROMPTS[0], seed=s) for s in (7, 7, 8))
    assert a == dataclasses.replace(b, latency_s=a.latency_s, ttft_s=a.ttft_s, started_s=a.started_s)
    assert a.response != c.response


def _force_stop(be, tokens=(), strings=()):
    be.use_template(dataclasses.replace(be.template, stop_token_ids=tuple(tokens), stop_strings=tuple(strings)))


def test_stop_token_stop_string_and_length_endings_mean_the_same_under_both_backends():
    hf, ours = _load("transformers", temperature=0), _load("compiled", temperature=0)
    free = ours.generate(SYSTEM, PROMPTS[1], seed=0)
    assert free.stop_reason == "length" and free.response_tokens == 40
    with torch.no_grad():  # the generated ids, from the loop itself
        ids, _ = ours._decode_eager(ours.encode(SYSTEM, PROMPTS[1])[0], 40, ours.kv_buckets[-1], 0.0)
    # A stop token: a generated token from the 6th on, where it first appears.
    stop_tok = next(t for i, t in enumerate(ids) if i >= 5 and t not in ids[:i])
    # A stop string: a piece of text from the middle of the response.
    stop_str = free.response[len(free.response) // 2:][:3]
    for kind, kwargs in (("stop_token", {"tokens": [stop_tok]}), ("stop_string", {"strings": [stop_str]})):
        for be in (hf, ours):
            _force_stop(be, **kwargs)
        a, b = hf.generate(SYSTEM, PROMPTS[1], seed=0), ours.generate(SYSTEM, PROMPTS[1], seed=0)
        assert b.stop_reason == a.stop_reason == kind
        assert (b.response, b.response_tokens) == (a.response, a.response_tokens)
        assert b.response_tokens < free.response_tokens and b.steps_past_stop == 0
        if kind == "stop_string":
            assert stop_str not in b.response and free.response.startswith(b.response)


def test_trim_takes_whichever_stop_comes_first():
    be = _load("compiled")
    _force_stop(be, tokens=[be.tokenizer.eos_token_id], strings=["ab"])
    ids = be.tokenizer("xx ab yy", add_special_tokens=False).input_ids
    n, text, why = be.trim(ids + [be.tokenizer.eos_token_id] + ids)
    assert (why, text) == ("stop_string", "xx ")
    n, text, why = be.trim(be.tokenizer("xx", add_special_tokens=False).input_ids + [be.tokenizer.eos_token_id] + ids)
    assert (why, text) == ("stop_token", "xx")


def test_top_p_and_repetition_penalty_match_hfs_processors():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        hf = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(top_p_mask(logits, top_p), torch.isinf(hf))
    history = torch.randint(0, 300, (4, 20))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter(1, history, True)
    for penalty in (0.8, 1.3):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        assert torch.allclose(penalize_repetition(logits, seen, penalty), hf)


def test_sampling_draws_from_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    torch.manual_seed(0)
    draws = sample(logits.expand(40000, -1), None, temperature=0.7, top_p=1.0, repetition_penalty=1.0)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, torch.softmax(logits / 0.7, -1), atol=0.01)
    greedy = sample(logits.expand(3, -1), None, temperature=0, top_p=1.0, repetition_penalty=1.0)
    assert greedy.tolist() == [0, 0, 0]
    # p = .56, .21, .13, .08, .03: the nucleus of 0.7 is the top two (the rest sum to .23 <= .3)
    nucleus = sample(logits.expand(5000, -1), None, temperature=1.0, top_p=0.7, repetition_penalty=1.0)
    assert set(nucleus.tolist()) == {0, 1}


def test_one_run_holds_a_model_under_both_backends_and_a_refused_model_is_a_failed_job(tmp_path):
    import pandas as pd

    from tests.helpers import run_sweep_cli, tasks_yaml, write_yaml

    neo = _tiny_checkpoint(tmp_path, "gpt_neo", attention_types=[[["global"], 2]], num_layers=2, window_size=256)
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "tiny", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1"},
        {"name": "tiny-compiled", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1", "backend": "compiled"},
        {"name": "neo-compiled", "path": neo, "conv_template": "vicuna_v1.1", "backend": "compiled"},
    ]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), temperature=0, cache_implementation="static", context_length=512)
    out = tmp_path / "runs"
    proc = run_sweep_cli("--config", models, "--tasks", tasks, "--out", out, "--run-id", "b", "--cpu-workers", "2",
                         "--no-dashboard", "--no-progress")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "neo-compiled / chat: BackendError: backend compiled: GPTNeoForCausalLM does not support" in proc.stdout
    df = pd.read_parquet(out / "b" / "results")
    assert set(df["model"]) == {"tiny", "tiny-compiled"} and len(df) == 8
    by = df.set_index(["model", "prompt_id"]).sort_index()
    assert set(df["backend"]) == {"transformers", "compiled"}
    # what each backend did on CPU, whatever tasks.yaml asked for
    assert set(by.loc["tiny", "cache_implementation"]) == {"dynamic"}
    assert set(by.loc["tiny-compiled", "cache_implementation"]) == {"static"}
    assert not df["compiled"].any() and (df["steps_past_stop"] == 0).all()
    # greedy: the same responses from both backends
    assert list(by.loc["tiny", "response"]) == list(by.loc["tiny-compiled", "response"])
    report = run_sweep_cli("report", out / "b")
    assert report.returncode == 0
    assert "tiny-compiled" in report.stdout and "compiled" in report.stdout.split("tiny-compiled")[1].splitlines()[0]


def test_a_stop_seen_late_is_counted_and_cut_from_the_response():
    be = _load("compiled")
    eos = be.tokenizer.eos_token_id
    _force_stop(be, tokens=[eos])
    ids = torch.zeros((1, 7), dtype=torch.long)
    out = be.result(ids, False, [5, 6, eos, 9], latency_s=1.0, ttft_s=0.1)
    assert (out.response_tokens, out.stop_reason, out.steps_past_stop, out.prompt_tokens) == (2, "stop_token", 1, 7)
    assert out.response == be.decode([5, 6])
    assert be.result(ids, False, [5, 6, 9], 1.0, 0.1).steps_past_stop == 0  # ran to max_new_tokens


def test_the_decode_step_traces_as_one_graph():
    # What the GPU path compiles, traced by Dynamo with fullgraph=True (a graph break raises);
    # aot_eager skips code generation, so this runs on CPU in seconds.
    be = _load("compiled", temperature=0.7, repetition_penalty=1.1, top_p=0.9)
    step = torch.compile(be._step, fullgraph=True, backend="aot_eager", dynamic=False)
    ids = be.encode(SYSTEM, PROMPTS[0])[0]
    with torch.no_grad():
        torch.manual_seed(0)
        be._prefill(be._load_prompt(ids))
        for _ in range(3):
            step()
    assert int(be._pos) == ids.shape[1] + 3
