"""`transformers` backend: Hugging Face `generate`, one request at a time (batch size 1).

The 2023-faithful path: plain `generate` with a dynamic cache, or HF's own static cache
(`cache_implementation: static`, which compiles the decode step) on GPU. The hot loop
decodes no text: tokens are counted from ids, text is decoded once per request after
generation ends (the 2023 script re-decoded the whole output at every token, which
inflated latency and energy).
"""

from __future__ import annotations

import time

import torch

from sweep.backends.base import Effective, Generation, HFModel


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


class TransformersBackend(HFModel):
    name = "transformers"

    def __init__(self, spec, settings, device: str) -> None:
        super().__init__(spec, settings, device)
        # HF's static cache is only worth it (and only compiled) on GPU: on CPU the
        # request runs with a dynamic cache, and the rows say so.
        static = settings.cache_implementation == "static" and self._input_device.type == "cuda"
        self.effective = Effective(cache_implementation="static" if static else "dynamic", compiled=static)

    def generate(self, system_prompt: str, user_text: str, seed: int) -> Generation:
        s = self.settings
        ids, truncated = self.encode(system_prompt, user_text)
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
        if s.temperature > 0:
            kwargs["top_k"] = 0  # HF samples from the top 50 unless told otherwise; 2023 (FastChat) did not
        if self.template.stop_strings:
            kwargs.update(stop_strings=list(self.template.stop_strings), tokenizer=self.tokenizer)
        if self.effective.cache_implementation == "static":
            # Sized for the longest request of the run: otherwise a longer prompt than any
            # before grows the cache and recompiles inside that request's energy window.
            kwargs.update(cache_implementation="static", max_cache_len=s.context_length)
        self._sync()
        started_s, t0 = time.monotonic(), time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        self._sync()
        latency_s = time.perf_counter() - t0
        ttft_s = None if clock.first_token_at is None else clock.first_token_at - t0
        return self.result(ids, truncated, out[0, ids.shape[1]:].tolist(), latency_s, ttft_s, started_s)
