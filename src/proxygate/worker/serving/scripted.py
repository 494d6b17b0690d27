"""The decode-only step of `LlamaRunner` as one TorchScript function (float16 weights on a CPU).

A decode step of a small model is ~1,200 tensor operations on one row
each; from Python every one pays the interpreter and the argument parsing
(a few microseconds), which at 30 layers was 4-5 ms of a 28 ms step. Here
the whole layer loop is one call: the same operations, in the same order,
run by TorchScript's interpreter, so the logits are the Python path's bit
for bit (tests/integration/test_runner.py checks that).

Only the commonest step takes this path: every row decodes one token and
the rows' slots are one contiguous range (see `runner._DecodeAttention`);
a step that reads a prompt chunk, or whose slots have gaps, runs in Python.
TorchScript is deprecated in torch 2.13 but present, and torch is pinned;
where it cannot compile, `compile_decode_layers` returns None and every
step runs in Python.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

log = logging.getLogger("proxygate.worker.hf")


def _decode_layers(
    x: torch.Tensor,
    rotation: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    lo: int,
    rows: int,
    length: int,
    mask: torch.Tensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    input_norms: list[torch.Tensor],
    post_norms: list[torch.Tensor],
    qkv: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    o: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    gate_up: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    down: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    hq: int,
    hk: int,
    d: int,
    intermediate: int,
    eps: float,
) -> torch.Tensor:
    n = x.shape[0]
    hidden = [x.shape[1]]
    for li in range(len(input_norms)):
        h = torch.rms_norm(x, hidden, input_norms[li], eps)
        qkv_out = torch.ops.quantized.linear_dynamic_fp16(h, qkv[li])
        pairs = torch.view_as_complex(qkv_out[:, : (hq + hk) * d].reshape(n, hq + hk, d // 2, 2))
        qk = torch.view_as_real(pairs * rotation).flatten(-2)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv_out[:, (hq + hk) * d :].view(n, hk, d)
        layer_keys, layer_values = keys[li], values[li]
        layer_keys[slots, :, positions] = k
        layer_values[slots, :, positions] = v
        ks = layer_keys[lo : lo + rows, :, :length]
        vs = layer_values[lo : lo + rows, :, :length]
        out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=mask, enable_gqa=True)
        x += torch.ops.quantized.linear_dynamic_fp16(out[:, :, 0].reshape(n, hq * d), o[li])
        h = torch.rms_norm(x, hidden, post_norms[li], eps)
        gu = torch.ops.quantized.linear_dynamic_fp16(h, gate_up[li])
        act = torch.nn.functional.silu(gu[:, :intermediate]).mul_(gu[:, intermediate:])
        x += torch.ops.quantized.linear_dynamic_fp16(act, down[li])
    return x


def compile_decode_layers() -> Any | None:
    """The scripted `_decode_layers`, or None where TorchScript cannot compile it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_decode_layers)
    except Exception:
        log.warning("TorchScript could not compile the decode step; it runs in Python", exc_info=True)
        return None
