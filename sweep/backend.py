"""Generation backend: Hugging Face transformers, one request at a time (batch size 1).

The hot loop decodes no text: tokens are counted from ids, text is decoded once per
request after generation ends (the 2023 script re-decoded the whole output at every
token, which inflated latency and energy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sweep.checkpoints import ensure_random_checkpoint, is_random
from sweep.config import GenerationSettings, ModelSpec
from sweep.templates import ChatTemplate, resolve

BACKEND_NAME = "transformers"


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int
    prompt_truncated: bool
    response_tokens: int  # generated tokens up to, not including, the stop token
    response: str
    latency_s: float  # wall time of the request, prefill included (device synchronised)
    ttft_s: float | None  # time to first generated token
    stop_reason: str  # "stop_token", "stop_string" or "length"


class _FirstTokenClock:
    """Streamer that only notes when the first generated token arrives (no decoding)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    # CPU kernels for float16 are slow or missing: CPU runs use float32 (recorded per row).
    if device == "cpu" and requested == "float16":
        return torch.float32
    return getattr(torch, requested)


class TransformersBackend:
    """A loaded model plus its chat template; `generate` serves one prompt."""

    name = BACKEND_NAME

    def __init__(self, spec: ModelSpec, settings: GenerationSettings, device: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.settings = settings
        self.device = device
        self.dtype = resolve_dtype(spec.dtype, device)
        source = str(ensure_random_checkpoint(spec.path)) if is_random(spec.path) else spec.path
        kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        placement = {"device_map": "auto"} if spec.gpus > 1 else {}
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype, **placement, **kwargs)
        if not placement:
            self.model.to(device)
        self.model.eval()
        self.params_b = spec.params_b or sum(p.numel() for p in self.model.parameters()) / 1e9
        self.template: ChatTemplate = resolve(spec.path, spec.conv_template, self.tokenizer, self.model.generation_config)
        self._input_device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (self.template.stop_token_ids or (None,))[0]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _sync(self) -> None:
        if self._input_device.type == "cuda":
            torch.cuda.synchronize(self._input_device)

    def generate(self, system_prompt: str, user_text: str, seed: int) -> Generation:
        s = self.settings
        text = self.template.render(system_prompt, user_text)
        ids = self.tokenizer(text, add_special_tokens=self.template.add_special_tokens, return_tensors="pt").input_ids
        budget = s.context_length - s.max_new_tokens
        truncated = ids.shape[1] > budget
        if truncated:  # keep the end: it holds the question and the assistant cue
            ids = ids[:, -budget:]
        ids = ids.to(self._input_device)
        torch.manual_seed(seed)
        clock = _FirstTokenClock()
        kwargs = dict(
            max_new_tokens=s.max_new_tokens,
            do_sample=s.temperature > 0,
            temperature=s.temperature if s.temperature > 0 else None,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=list(self.template.stop_token_ids) or None,
            pad_token_id=self._pad_id,
            streamer=clock,
        )
        if self.template.stop_strings:
            kwargs.update(stop_strings=list(self.template.stop_strings), tokenizer=self.tokenizer)
        if s.cache_implementation == "static" and self._input_device.type == "cuda":
            kwargs["cache_implementation"] = "static"
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        self._sync()
        latency_s = time.perf_counter() - t0
        generated = out[0, ids.shape[1]:].tolist()
        n_tokens, response, reason = self._trim(generated)
        return Generation(
            prompt_tokens=int(ids.shape[1]),
            prompt_truncated=truncated,
            response_tokens=n_tokens,
            response=response,
            latency_s=latency_s,
            ttft_s=None if clock.first_token_at is None else clock.first_token_at - t0,
            stop_reason=reason,
        )

    def _trim(self, generated: list[int]) -> tuple[int, str, str]:
        """(tokens before the stop, text before the stop, why generation ended)."""
        decode = lambda toks: self.tokenizer.decode(toks, skip_special_tokens=True)  # noqa: E731
        if generated and generated[-1] in self.template.stop_token_ids:
            return len(generated) - 1, decode(generated[:-1]), "stop_token"
        text = decode(generated)
        hits = [text.find(s) for s in self.template.stop_strings if s in text]
        if hits:
            # Drop the tokens that complete the stop string; done once per request, after timing.
            k = len(generated)
            while k > 0 and any(s in decode(generated[:k]) for s in self.template.stop_strings):
                k -= 1
            return k, text[: min(hits)], "stop_string"
        return len(generated), text, "length"
