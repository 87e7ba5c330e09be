"""The backend interface: one loaded model that serves one prompt at a time (batch 1).

`Backend` is what the worker calls: load (the constructor) and `close`, `generate` one
response into a `Generation` (what it actually did, so every stored row records the
effective settings, never only the requested ones), and `effective`, `template`,
`params_b`, `dtype_name`, `engine` for the row. `HFModel` is what the two in-process
backends share over a Hugging Face checkpoint: tokenizer, weights, template, prompt
truncation, and the stop-token / stop-string trimming after generation. The `server`
backend (sweep/backends/server.py) loads no weights: it drives a serving engine's HTTP API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sweep.checkpoints import ensure_random_checkpoint, is_random
from sweep.config import GenerationSettings, ModelSpec
from sweep.templates import ChatTemplate, resolve


class BackendError(RuntimeError):
    """The model cannot be served by this backend; the message says why and what to do."""


@dataclass(frozen=True)
class Generation:
    prompt_tokens: int
    prompt_truncated: bool
    response_tokens: int  # generated tokens up to, not including, the stop token
    response: str
    latency_s: float  # wall time of the request, prefill included (device synchronised)
    ttft_s: float | None  # time to first generated token
    stop_reason: str  # "stop_token", "stop_string" or "length"
    # Decode steps run after the step that ended the response (a stop checked late);
    # their time and energy are inside the request's window.
    steps_past_stop: int = 0
    started_s: float | None = None  # time.monotonic() at the request's start (device synchronised)
    # Which decode kernels ran (the compiled backend's attention length; 0 where all
    # requests run the same ones): the attribution fits one decode power per variant.
    decode_variant: int = 0

    def phases(self):
        """The request's prefill and decode on the monotonic clock (None without a start)."""
        from sweep.meters.attribution import Phases

        if self.started_s is None:
            return None
        first = self.started_s + (self.ttft_s if self.ttft_s is not None else 0.0)
        return Phases(self.started_s, min(first, self.started_s + self.latency_s), self.started_s + self.latency_s,
                      self.decode_variant)


@dataclass(frozen=True)
class Effective:
    """How a backend really generates, whatever was asked (recorded in every row)."""

    cache_implementation: str  # "dynamic" or "static"
    compiled: bool  # decode step compiled / replayed as a CUDA graph


class Backend:
    """One loaded model (or a server of one) that generates one response at a time."""

    name: ClassVar[str]
    effective: Effective
    template: ChatTemplate
    params_b: float
    dtype_name: str
    engine: str | None = None  # the serving engine and its version, where one serves the model
    engine_command: str | None = None  # how it was started (or what was attached to)

    def generate(self, system_prompt: str, user_text: str, seed: int) -> Generation:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (a server process, GPU memory)."""


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    # CPU kernels for float16 are slow or missing: CPU runs use float32 (recorded per row).
    if device == "cpu" and requested == "float16":
        return torch.float32
    return getattr(torch, requested)


def max_positions(config) -> int | None:
    """How many positions the model was built for (None when the config does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class HFModel(Backend):
    """A Hugging Face causal LM, its tokenizer and chat template, loaded for `device`."""

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
        positions = max_positions(self.model.config)
        if positions is not None and settings.context_length > positions:
            # Past its positions a model still emits tokens, but they mean nothing.
            raise BackendError(
                f"generation.context_length {settings.context_length} (prompt + max_new_tokens) exceeds the "
                f"{positions} positions of {spec.path}; lower context_length or max_new_tokens in tasks.yaml"
            )
        self.params_b = spec.params_b or sum(p.numel() for p in self.model.parameters()) / 1e9
        self.template: ChatTemplate = resolve(spec.path, spec.conv_template, self.tokenizer, self.model.generation_config)
        self._input_device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (self.template.stop_token_ids or (None,))[0]

    def use_template(self, template: ChatTemplate) -> None:
        """Serve with another chat template (its stop tokens and strings included)."""
        self.template = template

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _sync(self) -> None:
        if self._input_device.type == "cuda":
            torch.cuda.synchronize(self._input_device)

    def encode(self, system_prompt: str, user_text: str) -> tuple[torch.Tensor, bool]:
        """Prompt ids (1 x n, on the model's input device) and whether they were truncated."""
        s = self.settings
        text = self.template.render(system_prompt, user_text)
        ids = self.tokenizer(text, add_special_tokens=self.template.add_special_tokens, return_tensors="pt").input_ids
        budget = s.context_length - s.max_new_tokens
        truncated = ids.shape[1] > budget
        if truncated:  # keep the end: it holds the question and the assistant cue
            ids = ids[:, -budget:]
        return ids.to(self._input_device), truncated

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def trim(self, generated: list[int]) -> tuple[int, str, str]:
        """(tokens before the stop, text before the stop, why generation ended).

        Whichever comes first ends the response: a stop token, or the token that completes
        a stop string. Tokens after it (a backend that checks late) are not part of it."""
        stops = self.template.stop_token_ids
        end = next((i for i, tok in enumerate(generated) if tok in stops), len(generated))
        head = generated[:end]
        text = self.decode(head)
        hits = [text.find(s) for s in self.template.stop_strings if s in text]
        if hits:
            # Drop the tokens that complete the stop string; done once per request, after timing.
            k = len(head)
            while k > 0 and any(s in self.decode(head[:k]) for s in self.template.stop_strings):
                k -= 1
            return k, text[: min(hits)], "stop_string"
        if end < len(generated):
            return end, text, "stop_token"
        return len(generated), text, "length"

    def result(self, ids: torch.Tensor, truncated: bool, generated: list[int], latency_s: float,
               ttft_s: float | None, started_s: float | None = None, decode_variant: int = 0) -> Generation:
        """The request's record, from every token the backend generated (stop included)."""
        n_tokens, response, reason = self.trim(generated)
        # The token at index n_tokens ended the response (stop token, or the one completing a stop string).
        ended_at = len(generated) if reason == "length" else n_tokens + 1
        return Generation(
            prompt_tokens=int(ids.shape[1]),
            prompt_truncated=truncated,
            response_tokens=n_tokens,
            response=response,
            latency_s=latency_s,
            ttft_s=ttft_s,
            stop_reason=reason,
            steps_past_stop=len(generated) - ended_at,
            started_s=started_s,
            decode_variant=decode_variant,
        )
