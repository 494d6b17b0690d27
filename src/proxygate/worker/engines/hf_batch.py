"""A decode loop where sequences join and leave between steps (continuous batching).

It runs in one thread of its own, off the event loop. Every step decodes one
token for all active sequences at once: their key/value caches sit in one
batch, left-padded to a common length, with an attention mask and explicit
position ids, so each row computes exactly what it would alone. A new
sequence is prefilled alone, then merged into the batch; a finished or
cancelled one is dropped at the next step boundary (cancellation therefore
takes effect within one step).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .base import GenerationParams

log = logging.getLogger("proxygate.worker.hf")


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str  # "stop" | "length"


@dataclass(eq=False)
class Sequence:
    params: GenerationParams
    prompt_ids: list[int]
    emit: Callable[[object], None]  # thread-safe: str pieces, then Finished or an exception
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    # Incremental detokenisation: only generated[prefix_offset:] is decoded per
    # step (the text before it is final), so a step costs O(1), not O(length).
    prefix_offset: int = 0
    read_offset: int = 0
    cancelled: bool = False
    done: bool = False
    rng: torch.Generator | None = None


class BatchDecoder:
    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        eos = model.generation_config.eos_token_id
        self.eos: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self._incoming: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hf-decoder", daemon=True)
        # the batch
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T) long, 0 = left padding
        self._next: list[int] = []  # the token each row feeds into the next step
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            self._incoming.append(seq)
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(10)

    @property
    def active(self) -> int:
        return len(self._rows)

    # ---- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._incoming and not self._rows and not self._stopping:
                        self._wake.wait()
                    if self._stopping:
                        break
                    joining = list(self._incoming)
                    self._incoming.clear()
                try:
                    for seq in joining:
                        if not seq.cancelled:
                            self._join(seq)
                    self._drop_finished()
                    if self._rows:
                        self._step()
                        self._drop_finished()
                except Exception as exc:  # a broken step fails its sequences, not the worker
                    log.exception("decode step failed")
                    for seq in self._rows + joining:
                        if not seq.done:
                            seq.done = True
                            seq.emit(exc)
                    self._reset()
        for seq in self._rows + list(self._incoming):
            if not seq.done:
                seq.emit(RuntimeError("worker shutting down"))

    def _reset(self) -> None:
        self._rows, self._next, self._cache, self._mask = [], [], None, None

    # ---- joining, stepping, leaving ------------------------------------------

    def _join(self, seq: Sequence) -> None:
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        cache = DynamicCache()
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = self._sample(seq, out.logits[0, -1])
        if self._accept(seq, token):
            return  # finished on its first token: never joins the batch
        length = ids.shape[1]
        mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            assert self._mask is not None
            total = max(self._mask.shape[1], length)
            for mine, theirs in zip(_kv_layers(self._cache), _kv_layers(cache), strict=True):
                mine.keys = torch.cat([_left_pad(mine.keys, total), _left_pad(theirs.keys, total)], dim=0)
                mine.values = torch.cat([_left_pad(mine.values, total), _left_pad(theirs.values, total)], dim=0)
            self._mask = torch.cat([_left_pad_mask(self._mask, total), _left_pad_mask(mask, total)], dim=0)
        self._rows.append(seq)
        self._next.append(token)

    def _step(self) -> None:
        assert self._cache is not None and self._mask is not None
        input_ids = torch.tensor(self._next, device=self.device).unsqueeze(1)
        ones = torch.ones((len(self._rows), 1), dtype=torch.long, device=self.device)
        position_ids = self._mask.sum(dim=1, keepdim=True)  # real tokens so far = the new token's position
        self._mask = torch.cat([self._mask, ones], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=position_ids,
            past_key_values=self._cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
        self.steps += 1
        for i, seq in enumerate(self._rows):
            if seq.cancelled:
                continue
            token = self._sample(seq, logits[i])
            self._next[i] = token
            self._accept(seq, token)

    def _drop_finished(self) -> None:
        keep = [i for i, seq in enumerate(self._rows) if not (seq.done or seq.cancelled)]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self.device)
        mask = self._mask[index]
        # Columns that are padding in every remaining row are dead weight.
        first = int((mask.sum(dim=0) > 0).nonzero()[0])
        self._mask = mask[:, first:]
        for layer in _kv_layers(self._cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._rows = [self._rows[i] for i in keep]
        self._next = [self._next[i] for i in keep]

    # ---- tokens --------------------------------------------------------------

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        params = seq.params
        if params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = F.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            cut = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
            sorted_probs[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if seq.rng is None:
            seq.rng = torch.Generator(device=self.device)
            if params.seed is not None:
                seq.rng.manual_seed(params.seed)
            else:
                seq.rng.seed()
        return int(torch.multinomial(probs, 1, generator=seq.rng))

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Record a sampled token, emit its text; whether the sequence is finished."""
        if token in self.eos:
            return self._finish(seq, "stop")
        seq.generated.append(token)
        new = self._new_text(seq)
        if new:
            text = seq.sent + new
            for stop in seq.params.stop:
                at = text.find(stop, max(0, len(seq.sent) - len(stop) + 1))
                if at != -1:
                    piece = text[len(seq.sent) : at]
                    if piece:
                        seq.emit(piece)
                    seq.sent = text[:at]
                    return self._finish(seq, "stop")
            seq.emit(new)
            seq.sent = text
        if len(seq.generated) >= seq.params.max_tokens:
            return self._finish(seq, "length")
        return False

    def _new_text(self, seq: Sequence) -> str:
        """The text the newest token completes ("" while a character is still split)."""
        ids = seq.generated
        decode = self.tokenizer.decode
        before = decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        after = decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        # A token can end inside a multi-byte character: hold it back until complete.
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        return after[len(before) :]

    def _finish(self, seq: Sequence, reason: str) -> bool:
        seq.done = True
        seq.emit(Finished(reason))
        return True


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer key/value holders (all plain attention layers for the
    decoder-only models we load; transformers types them as a wider union)."""
    return list(cache.layers)


def _left_pad(t: torch.Tensor, total: int) -> torch.Tensor:
    missing = total - t.shape[2]
    return F.pad(t, (0, 0, missing, 0)) if missing > 0 else t


def _left_pad_mask(m: torch.Tensor, total: int) -> torch.Tensor:
    missing = total - m.shape[1]
    return F.pad(m, (missing, 0)) if missing > 0 else m
