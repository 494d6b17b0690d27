"""Choosing the next token from one row of logits: greedy, temperature, top-p, seed.

Pure (torch only, no model). Each sampled sequence owns a `torch.Generator`,
seeded from the request's seed when it has one, so a seeded request gives
the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: str = "cpu") -> torch.Generator:
    rng = torch.Generator(device=device)
    if seed is not None:
        rng.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    else:
        rng.seed()
    return rng


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (the nucleus)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> int:
    """One token id from a 1-D row of logits; temperature <= 0 is greedy (argmax, no randomness)."""
    if temperature <= 0 or rng is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=rng))
