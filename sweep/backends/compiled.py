"""`compiled` backend: a batch-1 decode loop that runs at the speed of the GPU, not Python.

Our own loop over the Hugging Face model's modules (no model code rewritten):

- a static KV cache of `context_length` positions, allocated once per load;
- prefill in eager mode, so a new prompt length never triggers a compile inside a
  measured window;
- the one-token decode step (forward + sampling on the GPU) compiled by Inductor and
  captured once as a CUDA graph at load; each token is one `graph.replay()`;
- no host synchronisation per token: each step copies its token into pinned host memory,
  and the host reads a token while the next `LOOKAHEAD_STEPS` steps are already queued,
  so the GPU never waits for Python (two steps ride out a host hiccup of a few ms, e.g.
  a Ray thread taking the interpreter). A stop is therefore seen up to two steps late:
  the window holds at most two decode steps past the stop, and the row says how many
  (`steps_past_stop`). Stop strings are checked on the decoded text of the last tokens.

On CPU the same loop runs uncompiled (and checks each token at once), so tests cover it.
Sampling follows HF's processors: repetition penalty on the raw logits, then
temperature, then top-p; a token is drawn with the exponential race (argmax of p / E,
E ~ Exp(1)), which samples exactly from p without a host sync. The request's seed seeds
the device generator, so a seed reproduces a response exactly.
"""

from __future__ import annotations

import inspect
import time

import torch

from sweep.backends.base import BackendError, Effective, Generation, HFModel

# Decode steps queued ahead of the token the host reads: the bound on steps
# inside a window past the stop is 2.
LOOKAHEAD_STEPS = 2


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's repetition penalty: logits of tokens already in the sequence are divided by
    `penalty` when positive and multiplied by it when negative."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for tokens outside the nucleus, as HF's TopPLogitsWarper decides (the most
    likely token is always kept)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    return drop_sorted.scatter(-1, order, drop_sorted)


def sample(logits: torch.Tensor, seen: torch.Tensor | None, temperature: float, top_p: float,
           repetition_penalty: float) -> torch.Tensor:
    """Next token ids (int64, logits' shape without the vocabulary dimension); no host sync.

    The settings are Python numbers fixed for a run, so the branches below are resolved
    when the step is compiled."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = penalize_repetition(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = logits.masked_fill(top_p_mask(logits, top_p), float("-inf"))
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1)


class CompiledBackend(HFModel):
    name = "compiled"
    # How the decode step is compiled. Measured on an H100 (bench/decode.py): coordinate-
    # descent tuning of Inductor's kernels took a 1.1B model from 413 to 472 tokens/s and
    # a 7B one from 147 to 167, for about a minute more at load.
    inductor_config: dict = {"coordinate_descent_tuning": True}

    def __init__(self, spec, settings, device: str) -> None:
        super().__init__(spec, settings, device)
        from transformers import StaticCache

        if not getattr(self.model, "_can_compile_fullgraph", False):
            raise BackendError(
                f"backend compiled: {type(self.model).__name__} does not support a static KV cache with a "
                f"compiled decode step (transformers marks it _can_compile_fullgraph = False); use backend: transformers"
            )
        s = settings
        dev = self._input_device
        self.on_cuda = dev.type == "cuda"
        self.effective = Effective(cache_implementation="static", compiled=self.on_cuda)
        self.cache = StaticCache(config=self.model.config, max_cache_len=s.context_length)
        window = min((getattr(layer, "max_cache_len", s.context_length) for layer in self.cache.layers),
                     default=s.context_length)
        if window < s.context_length:
            # A sliding-window layer that fills up takes a Python-side branch that a CUDA graph cannot follow.
            raise BackendError(f"backend compiled: the model's sliding-window attention ({window} positions) is "
                               f"shorter than generation.context_length {s.context_length}; lower context_length "
                               f"or use backend: transformers")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self._tok = torch.zeros((1, 1), dtype=torch.long, device=dev)  # last token, input of the next step
        self._pos = torch.zeros((1,), dtype=torch.long, device=dev)  # its position in the cache
        self._seen = torch.zeros((vocab,), dtype=torch.bool, device=dev) if s.repetition_penalty != 1.0 else None
        self.use_template(self.template)
        params = inspect.signature(self.model.forward).parameters
        self._keep_logits = "logits_to_keep" in params
        # The cache keeps its own fill level on the device; its keyword was renamed in transformers 5.2x.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._graph = None
        if self.on_cuda:
            self._host_tokens = torch.zeros((s.max_new_tokens,), dtype=torch.long, pin_memory=True)
            self._capture()

    def use_template(self, template) -> None:
        super().use_template(template)
        # Looked up once per token: kept ready here.
        self._stop_ids = frozenset(template.stop_token_ids)
        self._stop_strings = tuple(template.stop_strings)
        # A stop string of n bytes is completed within the last n text-bearing tokens; special
        # tokens decode to nothing, so look further back than that.
        self._stop_window = 2 * max((len(x.encode()) for x in self._stop_strings), default=0) + 8

    # -- the two pieces of model work --------------------------------------------------
    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return sample(logits, self._seen, s.temperature, s.top_p, s.repetition_penalty)

    def _accept(self, token: torch.Tensor) -> None:
        """Make `token` the input of the next step (static buffers, in place)."""
        self._tok.copy_(token.view(1, 1))
        self._pos.add_(1)
        if self._seen is not None:
            self._seen.index_fill_(0, token.view(1), True)

    def _prefill(self, ids: torch.Tensor) -> None:
        n = ids.shape[1]
        positions = torch.arange(n, device=ids.device)
        extra = {"logits_to_keep": 1} if self._keep_logits else {}
        logits = self.model(input_ids=ids, position_ids=positions.view(1, n), use_cache=True,
                            **{self._cache_kw: self.cache}, **extra).logits[0, -1]
        if self._seen is not None:
            self._seen.zero_()
            self._seen.index_fill_(0, ids[0], True)
        self._pos.fill_(n - 1)  # _accept moves it to n, the first token's position
        self._accept(self._sample(logits))

    def _step(self) -> None:
        """One decode step on the static buffers: forward of the last token, sample, accept."""
        logits = self.model(input_ids=self._tok, position_ids=self._pos.view(1, 1), use_cache=True,
                            **{self._cache_kw: self.cache}).logits[0, -1]
        self._accept(self._sample(logits))

    def _capture(self) -> None:
        """Compile the decode step and capture it as a CUDA graph (at load, never in a window)."""
        step = torch.compile(self._step, fullgraph=True, dynamic=False)
        with torch.no_grad(), torch._inductor.config.patch(self.inductor_config):
            self.cache.reset()
            self._prefill(torch.zeros((1, 8), dtype=torch.long, device=self._input_device))  # allocates the cache
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile and warm up off the capture stream
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                step()
            torch.cuda.synchronize()

    # -- one request -------------------------------------------------------------------
    def _stopped(self, tokens: list[int]) -> bool:
        """Does the last token end the response (stop token, or completes a stop string)?"""
        if tokens[-1] in self._stop_ids:
            return True
        if self._stop_strings:
            tail = self.decode(tokens[-self._stop_window:])
            return any(x in tail for x in self._stop_strings)
        return False

    def generate(self, system_prompt: str, user_text: str, seed: int) -> Generation:
        s = self.settings
        ids, truncated = self.encode(system_prompt, user_text)
        torch.manual_seed(seed)
        self._sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.on_cuda:
                tokens, ttft_s = self._decode_cuda(ids, s.max_new_tokens)
            else:
                tokens, ttft_s = self._decode_eager(ids, s.max_new_tokens, t0)
        self._sync()
        latency_s = time.perf_counter() - t0
        return self.result(ids, truncated, tokens, latency_s, ttft_s)

    def _decode_eager(self, ids: torch.Tensor, max_new: int, t0: float) -> tuple[list[int], float]:
        self.cache.reset()
        self._prefill(ids)
        ttft_s = time.perf_counter() - t0
        tokens = [int(self._tok)]
        while len(tokens) < max_new and not self._stopped(tokens):
            self._step()
            tokens.append(int(self._tok))
        return tokens, ttft_s

    def _decode_cuda(self, ids: torch.Tensor, max_new: int) -> tuple[list[int], float]:
        host = self._host_tokens  # pinned, sized for the run's max_new_tokens at load
        start, first = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        done = []  # one event per launched token: its value is in host[i] once the event has passed
        start.record()  # the GPU is idle here (synchronised): this is the request's start, as t0 is
        self.cache.reset()
        self._prefill(ids)
        first.record()

        def publish(i: int) -> None:
            host[i : i + 1].copy_(self._tok.view(1), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            done.append(ev)

        publish(0)
        tokens: list[int] = []
        while True:
            # Queue steps up to LOOKAHEAD_STEPS past the token read next, before reading it.
            while len(done) < max_new and len(done) <= len(tokens) + LOOKAHEAD_STEPS:
                self._graph.replay()
                publish(len(done))
            i = len(tokens)
            done[i].synchronize()
            tokens.append(int(host[i]))
            if self._stopped(tokens) or len(tokens) == len(done):
                break
        # Steps queued past the stop still run (inside the window); their tokens count
        # in steps_past_stop.
        for j in range(len(tokens), len(done)):
            done[j].synchronize()
            tokens.append(int(host[j]))
        return tokens, start.elapsed_time(first) / 1e3
