"""The forward pass of a Llama-family decoder over one step's tokens.

One step mixes sequences that decode one token with chunks of prompts being
read. Their tokens are flattened into one (tokens, hidden) matrix, so every
linear layer reads its weights once per step whatever the mix (the weights,
not the arithmetic, are what a CPU waits for). Only attention is per kind:
the decoding rows attend together over their slots' rows of the KV cache
(masked to each row's length), each prompt chunk over its own slot. Logits
are computed only for the rows that are sampled.

The weights are taken out of the transformers model once at start, with the
query/key/value projections fused into one matrix and gate/up into another:
two matmuls fewer per layer, and far fewer Python-level operations than the
generic module tree (bench/RESULTS.md has the measurements). The linear
layers' weight format and kernel are `linear`'s business; activations and
the KV cache are float32 on a CPU. With float16 (the default) or int4
weights on a CPU, a step in which every row decodes runs the layer loop
below as one TorchScript call (`scripted`): the same operations, without
Python's per-operation cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .kv_cache import KvCache
from .linear import INT4_DIRECT_ROWS, Float16Packed, Int4Grouped, Linear, bf16_beats_fp16_for_rows, make_linear
from .scripted import compile_decode_layers

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(slots=True)
class Layer:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass
class StepBatch:
    """One step's work, flattened: decode rows first, then each prompt chunk."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    decodes: int = 0  # the first `decodes` rows are one-token decodes
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, first position, tokens)
    sample_rows: list[int] = field(default_factory=list)  # rows whose logits are wanted, in order

    def add_decode(self, slot: int, position: int, token: int) -> None:
        assert not self.chunks, "decode rows come first"
        self.tokens.append(token)
        self.positions.append(position)
        self.slots.append(slot)
        self.sample_rows.append(self.decodes)
        self.decodes += 1

    def add_chunk(self, slot: int, start: int, tokens: Sequence[int], sample: bool) -> None:
        self.tokens.extend(tokens)
        self.positions.extend(range(start, start + len(tokens)))
        self.slots.extend([slot] * len(tokens))
        self.chunks.append((slot, start, len(tokens)))
        if sample:
            self.sample_rows.append(len(self.tokens) - 1)


class LlamaRunner:
    def __init__(self, model: Any, *, device: str, weights: str) -> None:
        """Linear weights in format `weights` (see `linear`); on a CPU everything else is float32."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"the hf engine runs {', '.join(SUPPORTED_TYPES)} models; this one is {cfg.model_type!r}")
        self.device = device
        on_cpu = device == "cpu"
        dtype = torch.float32 if on_cpu or weights == "int8" else getattr(torch, weights)
        self.dtype = dtype

        # int4's prompt chunks on a bfloat16 copy where this CPU's bfloat16 GEMM is the faster
        # (see `linear.Wide`; float16 weights do not get one: bench/RESULTS.md, "hf engine").
        self.wide = on_cpu and weights == "int4" and bf16_beats_fp16_for_rows()

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            return make_linear(weight, bias, weights, dtype, on_cpu, self.wide)

        self.layers_n = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.intermediate = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.max_positions = int(cfg.max_position_embeddings)
        self.vocab = int(cfg.vocab_size)
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach().to(dtype)
        self.norm = inner.norm.weight.detach().to(dtype)
        # 4-bit is for the decoder's layers: the output projection scores every
        # token of the vocabulary (GGUF files keep it in 8 bits or more).
        head_format = "float16" if weights == "int4" else weights
        self.lm_head = make_linear(model.lm_head.weight, None, head_format, dtype, on_cpu)  # few rows: no copy
        self.layers: list[Layer] = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            # Query and key rows are interleaved per head (see `_rope`); scores are unchanged.
            qkv_w = torch.cat([self._interleave(a.q_proj.weight), self._interleave(a.k_proj.weight), a.v_proj.weight])
            qkv_b = None
            if a.q_proj.bias is not None:
                q_b, k_b = self._interleave(a.q_proj.bias), self._interleave(a.k_proj.bias)
                qkv_b = torch.cat([q_b, k_b, a.v_proj.bias])
            self.layers.append(
                Layer(
                    input_norm=layer.input_layernorm.weight.detach().to(dtype),
                    qkv=linear(qkv_w, qkv_b),
                    o=linear(a.o_proj.weight, a.o_proj.bias),
                    post_norm=layer.post_attention_layernorm.weight.detach().to(dtype),
                    gate_up=linear(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                    down=linear(m.down_proj.weight),
                )
            )
        # RoPE tables as transformers computes them (float32, then the compute dtype).
        rotary = inner.rotary_emb
        inv_freq = rotary.inv_freq.detach().float()
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=inv_freq.device), inv_freq)
        rotation = torch.polar(torch.full_like(freqs, scaling), freqs)  # (positions, head_dim / 2)
        self.rotation = rotation.to(device)
        # On a CPU, float16 and int4 weights run decode-only steps as one TorchScript call (see `scripted`).
        self.scripted: Any = None
        self.scripted_rows = 0  # the most rows a step may have to take that path
        self._scripted_weights: list[list[Any]] = []
        linears = [lin for lyr in self.layers for lin in (lyr.qkv, lyr.o, lyr.gate_up, lyr.down)]
        fp16 = [lin for lin in linears if isinstance(lin, Float16Packed)]
        int4 = [lin for lin in linears if isinstance(lin, Int4Grouped) and lin.bias is None]
        if len(fp16) == len(linears):
            self._scripted_weights = [[lin.packed for lin in fp16], [], []]
            self.scripted_rows = 1 << 30  # any number
        elif len(int4) == len(linears):
            self._scripted_weights = [[], [lin.packed for lin in int4], [lin.scale_zero for lin in int4]]
            self.scripted_rows = INT4_DIRECT_ROWS
        if self._scripted_weights:
            self.scripted = compile_decode_layers()
            norms = [[lyr.input_norm for lyr in self.layers], [lyr.post_norm for lyr in self.layers]]
            self._scripted_weights = norms + self._scripted_weights

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights a step reads (the embedding table is only indexed)."""
        total = self.lm_head.nbytes
        return total + sum(lyr.qkv.nbytes + lyr.o.nbytes + lyr.gate_up.nbytes + lyr.down.nbytes for lyr in self.layers)

    def _interleave(self, w: torch.Tensor) -> torch.Tensor:
        """Reorder each head's rows from (first half, second half) to pairs (i, i + half).

        transformers rotates the two halves of a head against each other;
        with the rows paired, the rotation is one complex multiplication per
        pair (three tensor operations instead of seven).
        """
        d = self.head_dim
        shape = w.shape
        return w.detach().reshape(-1, 2, d // 2, *shape[1:]).transpose(1, 2).reshape(shape)

    def _rope(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x: (n, heads, dim) with interleaved pairs; rotation: (n, 1, dim / 2) complex."""
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)

    def forward(self, batch: StepBatch, kv: KvCache) -> torch.Tensor:
        """Logits (len(sample_rows), vocab) in float32; writes the step's KV into the cache."""
        dev = self.device
        n = len(batch.tokens)
        tokens = torch.tensor(batch.tokens, dtype=torch.long, device=dev)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=dev)
        slots = torch.tensor(batch.slots, dtype=torch.long, device=dev)
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        rotation = self.rotation[positions].unsqueeze(1)  # (n, 1, d / 2): broadcast over heads
        decode = _DecodeAttention(batch, kv, dev) if batch.decodes else None
        chunk_masks = [_chunk_mask(start, count, dev) for _slot, start, count in batch.chunks]
        x = self.embed[tokens]  # a copy: updated in place below
        if (
            self.scripted is not None
            and decode is not None
            and decode.direct
            and not batch.chunks
            and decode.rows <= self.scripted_rows
        ):
            x = self._scripted_decode(x, rotation, slots, positions, decode, kv)
            return self._logits(x, batch)
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.input_norm, self.eps)
            qkv = layer.qkv(h)
            qk = self._rope(qkv[:, : (hq + hk) * d].view(n, hq + hk, d), rotation)
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, (hq + hk) * d :].view(n, hk, d)
            keys, values = kv.keys[li], kv.values[li]
            keys[slots, :, positions] = k
            values[slots, :, positions] = v
            if decode is not None and not batch.chunks:  # decode-only step: no assembling
                out = decode.attend(q, keys, values)
            else:
                out = torch.empty((n, hq, d), dtype=x.dtype, device=dev)
                if decode is not None:
                    out[: batch.decodes] = decode.attend(q[: batch.decodes], keys, values)
            row = batch.decodes
            for (slot, start, count), mask in zip(batch.chunks, chunk_masks, strict=True):
                qs = q[row : row + count].transpose(0, 1).unsqueeze(0)  # (1, hq, count, d)
                ks = keys[slot : slot + 1, :, : start + count]
                vs = values[slot : slot + 1, :, : start + count]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
                out[row : row + count] = o[0].transpose(0, 1)
                row += count
            x += layer.o(out.reshape(n, hq * d))
            h = F.rms_norm(x, (x.shape[-1],), layer.post_norm, self.eps)
            gu = layer.gate_up(h)
            x += layer.down(F.silu(gu[:, : self.intermediate]).mul_(gu[:, self.intermediate :]))
        return self._logits(x, batch)

    def _logits(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        if not batch.sample_rows:  # only prompt chunks that do not finish their prompt
            return torch.empty((0, self.vocab), dtype=torch.float32, device=self.device)
        rows = torch.tensor(batch.sample_rows, dtype=torch.long, device=self.device)
        last = F.rms_norm(x.index_select(0, rows), (x.shape[-1],), self.norm, self.eps)
        return self.lm_head(last).float()

    def _scripted_decode(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        decode: _DecodeAttention,
        kv: KvCache,
    ) -> torch.Tensor:
        """The layer loop of a decode-only step over a contiguous slot range, in one TorchScript call."""
        d = decode
        shape = (self.heads, self.kv_heads, self.head_dim, self.intermediate, self.eps)
        return self.scripted(
            x,
            rotation,
            slots,
            positions,
            d.lo,
            d.rows,
            d.length,
            d.mask,
            kv.keys,
            kv.values,
            *self._scripted_weights,
            *shape,
        )


def _chunk_mask(start: int, count: int, device: str) -> torch.Tensor | None:
    """Causal mask of a prompt chunk at `start`: row i sees positions <= start + i."""
    if count == 1:
        return None  # one query sees everything written so far
    cols = torch.arange(start + count, device=device)
    rows = torch.arange(start, start + count, device=device)
    return (cols[None, :] <= rows[:, None]).view(1, 1, count, start + count)


class _DecodeAttention:
    """Attention of the step's one-token decode rows, batched over a contiguous range of slots.

    Slots are handed out lowest first, so decoding rows are usually one
    contiguous range: attention then reads the cache through a view, with no
    gather. Slots in the range that do not decode this step get a dummy row
    (masked to position 0, result ignored).
    """

    def __init__(self, batch: StepBatch, kv: KvCache, device: str) -> None:
        slots = batch.slots[: batch.decodes]
        positions = batch.positions[: batch.decodes]
        self.lo = min(slots)
        self.rows = max(slots) - self.lo + 1
        self.length = max(positions) + 1
        self.index = torch.tensor([s - self.lo for s in slots], dtype=torch.long, device=device)
        self.direct = self.rows == len(slots) and slots == list(range(self.lo, self.lo + self.rows))
        if self.direct and all(p == self.length - 1 for p in positions):
            self.mask: torch.Tensor | None = None  # every row sees the whole range
        else:
            seen = torch.zeros(self.rows, dtype=torch.long, device=device)  # dummy rows see position 0
            seen[self.index] = torch.tensor(positions, dtype=torch.long, device=device)
            cols = torch.arange(self.length, device=device)
            self.mask = (cols[None, :] <= seen[:, None]).view(self.rows, 1, 1, self.length)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q: (decodes, heads, dim) → (decodes, heads, dim)."""
        ks = keys[self.lo : self.lo + self.rows, :, : self.length]
        vs = values[self.lo : self.lo + self.rows, :, : self.length]
        if self.direct:
            qs = q.unsqueeze(2)
        else:
            qs = torch.zeros((self.rows, q.shape[1], 1, q.shape[2]), dtype=q.dtype, device=q.device)
            qs[self.index] = q.unsqueeze(2)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self.mask, enable_gqa=True)
        return o[:, :, 0] if self.direct else o[self.index, :, 0]
