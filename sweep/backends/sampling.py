"""Sampling on the GPU as HF's logits processors do it, with no host sync: the compiled
backend's decode step samples inside its CUDA graph."""

from __future__ import annotations

import torch


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
