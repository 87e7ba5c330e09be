"""The compiled backend's decode attention: a one-token query over a bucket of the static
KV cache, as a custom op the compiler does not trace into, registered with transformers'
attention interface.

Each backend instance owns its `AttentionOptions` and registers its attention under a name
of its own (`register_attention`), so two backends in one process, or a bench comparing
ways of attending, never share a setting. The op reads the options when it runs, not when
the step is compiled: a graph captured under one `kv_len` keeps it, so one compiled step
serves every bucket's graph.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION = "sweep_bucketed_sdpa"


@dataclass(eq=False)
class AttentionOptions:
    """How one backend's decode steps attend."""

    # "flash" (FlashAttention's KV-cache decode, which splits the keys across thread blocks
    # and reads the fill level from the device) or "sdpa" (PyTorch's SDPA with the additive
    # mask: one thread block per KV head).
    kernel: str = "sdpa"
    # How grouped KV heads are attended by "sdpa": "fold" the query heads sharing a KV head
    # into rows of one query, or "repeat" K and V per query head.
    grouping: str = "fold"
    sdpa_backend: object | None = None  # a torch.nn.attention.SDPBackend to force; None: PyTorch's choice
    kv_len: int | None = None  # cache positions attended (None: all); set by the backend per bucket
    handle: int = -1  # set by register_attention: how the op finds these options
    cu_seqlens: dict = field(default_factory=dict)  # (device, kv_len) -> FlashAttention's lengths, made once


_handles = itertools.count()
_registered: weakref.WeakValueDictionary[int, AttentionOptions] = weakref.WeakValueDictionary()


def register_attention(options: AttentionOptions) -> str:
    """Register the attention of `options` with transformers; returns the attention
    implementation's name to set the model to."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    options.handle = next(_handles)
    _registered[options.handle] = options
    name = f"{ATTENTION}_{options.handle}"
    AttentionInterface.register(name, functools.partial(bucketed_sdpa, options=options))
    AttentionMaskInterface.register(name, additive_mask)
    return name


def flash_decode_available() -> bool:
    schema = getattr(getattr(torch.ops.aten, "_flash_attention_forward", None), "default", None)
    return schema is not None and "seqused_k" in {a.name for a in schema._schema.arguments}


def _flash_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, used_k: torch.Tensor,
                  scale: float | None, options: AttentionOptions) -> torch.Tensor:
    """One query token over the first used_k[0] positions of the cache (a device count: no
    mask, no host sync), as FlashAttention's variable-length forward with `seqused_k`. For
    grouped KV heads it folds the query heads sharing one into rows and splits the keys
    across thread blocks, so a short cache still fills the GPU."""
    kv_len = key.shape[2]
    b, heads, _, dim = query.shape
    cu = options.cu_seqlens.get((query.device, kv_len))
    if cu is None:  # the first call is a warm-up, never inside a graph capture
        cu = options.cu_seqlens[(query.device, kv_len)] = (
            torch.tensor([0, 1], dtype=torch.int32, device=query.device),
            torch.tensor([0, kv_len], dtype=torch.int32, device=query.device))
    # (tokens, heads, dim) views of the cache's (1, heads, positions, dim): no copy
    out = torch.ops.aten._flash_attention_forward(
        query.reshape(heads, dim).unsqueeze(0), key[0].transpose(0, 1), value[0].transpose(0, 1), cu[0], cu[1],
        1, kv_len, 0.0, False, False, scale=scale, seqused_k=used_k)[0]
    return out.view(b, heads, 1, value.shape[-1])


@torch.library.custom_op("sweep::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None, used_k: torch.Tensor | None, options: int) -> torch.Tensor:
    """SDPA of a one-token query (batch, heads, 1, dim) over the first `kv_len` positions of
    the cache, as the registered options (`options`: their handle) say. The positions cut
    off are ones the mask hides anyway: the result is the same, without reading them.
    Query heads that share a KV head become rows of one query, so K and V are read once,
    not copied per query head (what transformers' `repeat_kv` does). `used_k` (int32,
    (1,)): how many positions hold keys, for the flash kernel, which needs no mask."""
    o = _registered[options]
    if o.kv_len is not None and o.kv_len < key.shape[2]:
        key, value = key[:, :, :o.kv_len], value[:, :, :o.kv_len]
        mask = None if mask is None else mask[..., :o.kv_len]
    if used_k is not None and query.is_cuda and o.kernel == "flash" and query.shape[0] == 1:
        return _flash_decode(query, key, value, used_k, scale, o)
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    with nullcontext() if o.sdpa_backend is None else torch.nn.attention.sdpa_kernel(o.sdpa_backend):
        if groups > 1 and o.grouping == "repeat":
            key = key[:, :, None].expand(b, kv_heads, groups, *key.shape[2:]).reshape(b, heads, *key.shape[2:])
            value = value[:, :, None].expand(b, kv_heads, groups, *value.shape[2:]).reshape(b, heads, *value.shape[2:])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        else:
            out = F.scaled_dot_product_attention(query.reshape(b, kv_heads, groups, dim), key, value,
                                                 attn_mask=mask, scale=scale)
    return out.reshape(b, heads, 1, value.shape[-1])


@decode_attention.register_fake
def _(query, key, value, mask, scale, used_k, options):
    return query.new_empty((*query.shape[:3], value.shape[-1]))


def bucketed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *,
                  options: AttentionOptions, **kwargs):
    """transformers' SDPA attention, with decode steps through `decode_attention`. The
    decode step's position (transformers passes `position_ids` down to attention) gives the
    number of cached keys the flash kernel reads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] == 1 and attention_mask is not None and not kwargs.get("softcap"):
        positions = kwargs.get("position_ids")
        used_k = None
        if positions is not None and query.shape[0] == 1 and options.kernel == "flash":
            used_k = (positions.reshape(-1)[-1:] + 1).to(torch.int32)  # the same in every layer: computed once
        out = decode_attention(query, key, value, attention_mask, scaling, used_k, options.handle)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def additive_mask(*args, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor:
    """transformers' SDPA mask, additive (0 or the dtype's minimum, in the model's dtype),
    made once per forward: SDPA would convert a boolean one in every layer, three kernels
    each. Never dropped for SDPA's is_causal either, which transformers decides with a
    host-side check on a device tensor that a captured prefill cannot have. (transformers'
    own `eager_mask` copies a CPU scalar to the GPU, which a capture cannot have.)"""
    from transformers.masking_utils import sdpa_mask

    keep = sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    if keep is None:  # nothing to mask
        return None
    return torch.zeros_like(keep, dtype=dtype).masked_fill_(keep.logical_not(), torch.finfo(dtype).min)
