"""`compiled` backend: a batch-1 decode loop that runs at the speed of the GPU, not Python.

Our own loop over the Hugging Face model's modules (no model code rewritten):

- a static KV cache of `context_length` positions, allocated once per load;
- the one-token decode step (forward + sampling on the GPU) compiled by Inductor and
  captured as CUDA graphs at load; each token is one `graph.replay()`. A step attends
  over a bucket of the cache, not all of it: the smallest of `context_length`, /2, /4
  and /8 that holds the prompt and `max_new_tokens` (one graph per bucket), so a short
  request does not read the keys and values of thousands of empty positions per token.
  For grouped-query attention the step folds the query heads that share a key/value head
  into one attention call instead of copying the keys and values once per query head
  (`bucketed_sdpa`, registered with transformers' attention interface);
- prefill of the prompt padded to a power-of-two bucket, run eagerly once per bucket at
  load and replayed as a CUDA graph: a new prompt length never compiles or captures
  anything inside a measured window, and the prefill costs no Python per layer. The pad
  positions are written to the cache and then overwritten by the decode steps; the cache's
  fill level is set to the real prompt length, so the mask never lets a pad be attended;
- no host synchronisation per token: each step copies its token into pinned host memory,
  and the host reads a token while the next `LOOKAHEAD_STEPS` steps are already queued,
  so the GPU never waits for Python (two steps ride out a host hiccup of a few ms, e.g.
  a Ray thread taking the interpreter). A stop is therefore seen up to two steps late:
  the window holds at most two decode steps past the stop, and the row says how many
  (`steps_past_stop`). Stop strings are checked on the decoded text of the last tokens.

On CPU the same loop (padded prefill, buckets, folded heads) runs uncompiled and checks
each token at once, so tests cover it.
Sampling follows HF's processors: repetition penalty on the raw logits, then
temperature, then top-p; a token is drawn with the exponential race (argmax of p / E,
E ~ Exp(1)), which samples exactly from p without a host sync. The request's seed seeds
the device generator, so a seed reproduces a response exactly.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from sweep.backends.base import BackendError, Effective, Generation, HFModel
from sweep.backends.decode_attention import AttentionOptions, flash_decode_available, register_attention
from sweep.backends.sampling import sample

# Decode steps queued ahead of the token the host reads: the bound on steps
# inside a window past the stop is 2.
LOOKAHEAD_STEPS = 2
# Attention lengths a decode step is captured for: context_length >> k, k < KV_BUCKETS
# (one graph each, captured at load from one compiled step), none shorter than MIN_KV_BUCKET.
KV_BUCKETS = 4
MIN_KV_BUCKET = 128
MIN_PROMPT_BUCKET = 16


def kv_buckets(context_length: int, count: int = KV_BUCKETS) -> list[int]:
    """Attention lengths, shortest first: context_length, /2, /4... (count of them)."""
    sizes = {context_length >> k for k in range(count)}
    return sorted(x for x in sizes if x >= min(MIN_KV_BUCKET, context_length))


def prompt_buckets(budget: int) -> list[int]:
    """Prefill widths, shortest first: powers of two from MIN_PROMPT_BUCKET, then `budget`
    (the longest prompt a request can have)."""
    sizes, width = [], MIN_PROMPT_BUCKET
    while width < budget:
        sizes.append(width)
        width *= 2
    return sizes + [budget]


def bucket_for(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


@dataclass(frozen=True)
class CompiledOptions:
    """How the compiled backend builds its decode loop (benchmarks compare other choices;
    docs/benchmarks/ has their figures)."""

    # Coordinate-descent tuning makes Inductor compute each matrix-vector product as a tuned
    # Triton reduction (faster than cuBLAS at batch 1, for about a minute more at load).
    # Pointwise work of more than 8 ops is stored once, not recomputed inside every
    # reduction that reads it (silu(gate) * up is read by each row of down_proj).
    inductor_config: dict = field(default_factory=lambda: {"coordinate_descent_tuning": True,
                                                           "realize_opcount_threshold": 8})
    # The decode step's attention on CUDA (sweep.backends.decode_attention): "flash" beats
    # "sdpa" for grouped KV heads and loses for one KV head per query head, timed alone
    # (bench/decode_step.py --attention-only); "sdpa" stays until whole requests measure it.
    attention_kernel: str = "sdpa"
    kv_bucket_count: int = KV_BUCKETS  # 1: every step attends over the whole cache
    bucketed_attention: bool = True  # False: transformers' own SDPA
    prefill_graphs: bool = True  # False: eager prefill of the exact prompt


class CompiledBackend(HFModel):
    name = "compiled"

    def __init__(self, spec, settings, device: str, options: CompiledOptions | None = None) -> None:
        super().__init__(spec, settings, device)
        from transformers import StaticCache

        self.options = o = options or CompiledOptions()
        self.attention = AttentionOptions(kernel=o.attention_kernel if flash_decode_available() else "sdpa")

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
        if not all(hasattr(layer, "cumulative_length") for layer in self.cache.layers):
            raise BackendError("backend compiled: this transformers version's StaticCache keeps no fill level on the "
                               "device (cumulative_length); use transformers >= 5.0 or backend: transformers")
        # Bucketed attention replaces SDPA only: a model on another implementation (eager for
        # logit soft-capping, say) keeps it and attends over the whole cache.
        if o.bucketed_attention and self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation(register_attention(self.attention))
            self.kv_buckets = kv_buckets(s.context_length, o.kv_bucket_count)
        else:
            self.kv_buckets = [s.context_length]
        self.prompt_budget = s.context_length - s.max_new_tokens  # what encode() truncates prompts to
        self.prompt_buckets = prompt_buckets(self.prompt_budget)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        # Static buffers: the inputs of the captured prefill and steps, updated in place.
        self._ids = torch.zeros((1, self.prompt_budget), dtype=torch.long, device=dev)  # prompt, padded
        self._positions = torch.arange(self.prompt_budget, device=dev).view(1, -1)
        self._n = torch.zeros((), dtype=torch.long, device=dev)  # prompt length
        self._last = torch.zeros((1,), dtype=torch.long, device=dev)  # its last position
        self._tok = torch.zeros((1, 1), dtype=torch.long, device=dev)  # last token, input of the next step
        self._pos = torch.zeros((1,), dtype=torch.long, device=dev)  # its position in the cache
        self._seen = torch.zeros((vocab,), dtype=torch.bool, device=dev) if s.repetition_penalty != 1.0 else None
        self.use_template(self.template)
        params = inspect.signature(self.model.forward).parameters
        self._keep_logits = "logits_to_keep" in params
        # The cache keeps its own fill level on the device; its keyword was renamed in transformers 5.2x.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._step_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.on_cuda:
            self._host_tokens = torch.zeros((s.max_new_tokens,), dtype=torch.long, pin_memory=True)
            # One event per token a request can make, created once (recorded again by each request).
            self._events = [torch.cuda.Event() for _ in range(s.max_new_tokens)]
            self._capture()

    def use_template(self, template) -> None:
        super().use_template(template)
        # Looked up once per token: kept ready here.
        self._stop_ids = frozenset(template.stop_token_ids)
        self._stop_strings = tuple(template.stop_strings)
        # A stop string of n bytes is completed within the last n text-bearing tokens; special
        # tokens decode to nothing, so look further back than that.
        self._stop_window = 2 * max((len(x.encode()) for x in self._stop_strings), default=0) + 8

    # -- the pieces of model work, on the static buffers ----------------------------------
    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.settings
        return sample(logits, self._seen, s.temperature, s.top_p, s.repetition_penalty)

    def _accept(self, token: torch.Tensor) -> None:
        """Make `token` the input of the next step (static buffers, in place)."""
        self._tok.copy_(token.view(1, 1))
        self._pos.add_(1)
        if self._seen is not None:
            self._seen.index_fill_(0, token.view(1), True)

    def _load_prompt(self, ids: torch.Tensor) -> int:
        """Put the prompt in the static buffers, padded with its first token to its bucket's
        width (a pad can only add an already-seen token to the repetition penalty's set);
        returns the width."""
        n = ids.shape[1]
        width = bucket_for(n, self.prompt_buckets)
        self._ids[:, :n].copy_(ids)
        self._ids[:, n:width].copy_(ids[:, :1].expand(1, width - n))
        self._n.fill_(n)
        self._last.fill_(n - 1)
        self._n_host = n
        return width

    def _set_host_fill(self, n: int) -> None:
        """Sliding-window cache layers also count their fill in a Python int; it picks the
        branch an update takes (all the same while the window, at least context_length, is
        not full), so it only needs to be right for eager runs and the same at each trace."""
        for layer in self.cache.layers:
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = n

    def _prefill(self, width: int) -> None:
        """Prefill of the prompt in the buffers (padded to `width`), then its first token."""
        for layer in self.cache.layers:
            layer.cumulative_length.zero_()
        self._set_host_fill(0)
        ids = self._ids[:, :width]
        keep = {"logits_to_keep": self._last} if self._keep_logits else {}
        logits = self.model(input_ids=ids, position_ids=self._positions[:, :width], use_cache=True,
                            **{self._cache_kw: self.cache}, **keep).logits
        logits = logits[0, -1] if self._keep_logits else logits[0].index_select(0, self._last)[0]
        # The pads' keys and values stay in the cache past the prompt: each decode step
        # overwrites the next one before the mask lets it be attended.
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(self._n)
        self._set_host_fill(self._n_host)
        if self._seen is not None:
            self._seen.zero_()
            self._seen.index_fill_(0, ids[0], True)
        self._pos.copy_(self._last)  # _accept moves it to n, the first token's position
        self._accept(self._sample(logits))

    def _step(self) -> None:
        """One decode step on the static buffers: forward of the last token, sample, accept.
        It attends over `self.attention.kv_len` positions (set by the caller)."""
        logits = self.model(input_ids=self._tok, position_ids=self._pos.view(1, 1), use_cache=True,
                            **{self._cache_kw: self.cache}).logits[0, -1]
        self._accept(self._sample(logits))

    def _capture(self) -> None:
        """Compile the decode step and capture it for each attention bucket, and the prefill
        for each width, as CUDA graphs (at load, never in a window)."""
        step = torch.compile(self._step, fullgraph=True, dynamic=False)
        pool = torch.cuda.graph_pool_handle()  # the graphs run one at a time: they share their memory
        with torch.no_grad(), torch._inductor.config.patch(self.options.inductor_config):
            self._prefill(self._load_prompt(torch.zeros((1, 8), dtype=torch.long, device=self._input_device)))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile and warm up off the capture stream
                for kv_len in self.kv_buckets:
                    self.attention.kv_len = kv_len
                    for _ in range(2):
                        self._set_host_fill(8)  # the same at every call: no recompile
                        step()
                if self.options.prefill_graphs:
                    for width in self.prompt_buckets:
                        self._prefill(width)
            torch.cuda.current_stream().wait_stream(side)
            for kv_len in self.kv_buckets:
                self.attention.kv_len = kv_len
                self._set_host_fill(8)
                self._step_graphs[kv_len] = graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    step()
            if self.options.prefill_graphs:
                for width in self.prompt_buckets:
                    self._prefill_graphs[width] = graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._prefill(width)
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
        kv_len = bucket_for(ids.shape[1] + s.max_new_tokens, self.kv_buckets)
        torch.manual_seed(seed)
        self._sync()
        started_s, t0 = time.monotonic(), time.perf_counter()
        with torch.no_grad():
            if self.on_cuda:
                tokens, ttft_s = self._decode_cuda(ids, s.max_new_tokens, kv_len)
            else:
                tokens, ttft_s = self._decode_eager(ids, s.max_new_tokens, kv_len, t0)
        self._sync()
        latency_s = time.perf_counter() - t0
        return self.result(ids, truncated, tokens, latency_s, ttft_s, started_s, decode_variant=kv_len)

    def _decode_eager(self, ids: torch.Tensor, max_new: int, kv_len: int, t0: float) -> tuple[list[int], float]:
        self._prefill(self._load_prompt(ids))
        ttft_s = time.perf_counter() - t0
        tokens = [int(self._tok)]
        self.attention.kv_len = kv_len
        while len(tokens) < max_new and not self._stopped(tokens):
            self._step()
            tokens.append(int(self._tok))
        return tokens, ttft_s

    def _decode_cuda(self, ids: torch.Tensor, max_new: int, kv_len: int) -> tuple[list[int], float]:
        host, events = self._host_tokens, self._events  # sized for the run's max_new_tokens at load
        step = self._step_graphs[kv_len]
        start, first = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()  # the GPU is idle here (synchronised): this is the request's start, as t0 is
        width = self._load_prompt(ids)
        if self.options.prefill_graphs:
            self._prefill_graphs[width].replay()
        else:
            self._prefill(width)
        first.record()
        launched = 0  # tokens whose step is queued; token i is in host[i] once events[i] has passed

        def publish() -> None:
            nonlocal launched
            host[launched : launched + 1].copy_(self._tok.view(1), non_blocking=True)
            events[launched].record()
            launched += 1

        publish()
        tokens: list[int] = []
        while True:
            # Queue steps up to LOOKAHEAD_STEPS past the token read next, before reading it.
            while launched < max_new and launched <= len(tokens) + LOOKAHEAD_STEPS:
                step.replay()
                publish()
            i = len(tokens)
            events[i].synchronize()
            tokens.append(int(host[i]))
            if self._stopped(tokens) or len(tokens) == launched:
                break
        # Steps queued past the stop still run (inside the window); their tokens count
        # in steps_past_stop.
        for j in range(len(tokens), launched):
            events[j].synchronize()
            tokens.append(int(host[j]))
        return tokens, start.elapsed_time(first) / 1e3
