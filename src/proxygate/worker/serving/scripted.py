"""The decode-only step of `LlamaRunner` as one TorchScript function (float16 or int4 weights on a CPU).

A decode step of a small model is ~1,200 tensor operations on one row
each; from Python every one pays the interpreter and the argument parsing
(a few microseconds), which at 30 layers was 4-5 ms of a 28 ms step. Here
the whole layer loop is one call: the same operations, in the same order,
run by TorchScript's interpreter, so the logits are the Python path's bit
for bit (tests/integration/test_runner.py checks that).

Only the commonest step takes this path: every row decodes one token and
the rows' slots are one contiguous range (see `runner._DecodeAttention`);
a step that reads a prompt chunk, or whose slots have gaps, runs in Python,
as does an int4 step of more rows than `linear.INT4_DIRECT_ROWS`.
TorchScript is deprecated in torch 2.13 but present, and torch is pinned;
where it cannot compile, `compile_decode_layers` returns None and every
step runs in Python.
"""

from __future__ import annotations

from typing import Any

import torch

from .linear import INT4_GROUP, torchscript

assert INT4_GROUP == 32, "the literal 32 in _linear below is the int4 group size"


def _linear(
    x: torch.Tensor,
    i: int,
    fp16: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    int4: list[torch.Tensor],
    int4_scale_zero: list[torch.Tensor],
) -> torch.Tensor:
    """Linear layer i of the step, in whichever format was given (see `linear`)."""
    if len(int4) > 0:
        # 32: linear.INT4_GROUP (TorchScript does not read module globals).
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), int4[i], 32, int4_scale_zero[i])
        return y.to(x.dtype)
    return torch.ops.quantized.linear_dynamic_fp16(x, fp16[i])


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
    fp16: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
    int4: list[torch.Tensor],
    int4_scale_zero: list[torch.Tensor],
    hq: int,
    hk: int,
    d: int,
    intermediate: int,
    eps: float,
) -> torch.Tensor:
    """Every layer of a decode-only step; each layer's linears are 4 * layer + (qkv, o, gate_up, down)."""
    n = x.shape[0]
    hidden = [x.shape[1]]
    for li in range(len(input_norms)):
        h = torch.rms_norm(x, hidden, input_norms[li], eps)
        qkv_out = _linear(h, 4 * li, fp16, int4, int4_scale_zero)
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
        x += _linear(out[:, :, 0].reshape(n, hq * d), 4 * li + 1, fp16, int4, int4_scale_zero)
        h = torch.rms_norm(x, hidden, post_norms[li], eps)
        gu = _linear(h, 4 * li + 2, fp16, int4, int4_scale_zero)
        act = torch.nn.functional.silu(gu[:, :intermediate]).mul_(gu[:, intermediate:])
        x += _linear(act, 4 * li + 3, fp16, int4, int4_scale_zero)
    return x


def compile_decode_layers() -> Any | None:
    """The scripted `_decode_layers`, or None where TorchScript cannot compile it."""
    return torchscript(_decode_layers)
