"""The engine's decode thread: admission, step planning, the forward pass, sampling, output.

One thread owns the model, the KV memory and every running sequence; the
event loop only submits sequences and reads what they emit. Each turn of the
loop:

1. takes new sequences into the waiting queue (highest priority first, then
   arrival), drops cancelled ones, and admits waiting sequences while a KV
   slot is free (the engine, which knows its memory, is the arbiter of its
   capacity; the rest wait here, not in the gRPC server);
2. reuses cached prompt prefixes for the sequences it admits;
3. plans a step within the token budget (`plan_step`), runs it, and samples
   a token for every row that finished its prompt or decoded;
4. emits text as the stop checker releases it, and frees finished slots.

A failure is contained to the sequences it concerns: one that fails while
joining (admission, prefix reuse, or a step that carried its prompt chunk)
fails alone, and the decoding sequences carry on at the next step.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..engines.base import GenerationParams
from .detokenizer import Decode, IncrementalDetokenizer, StopChecker
from .kv_cache import KvCache
from .planner import plan_step
from .prefix_cache import PrefixIndex, block_digests
from .runner import StepBatch
from .sampler import make_generator, sample

log = logging.getLogger("proxygate.worker.hf")


@dataclass(frozen=True, slots=True)
class Started:
    """First message of a sequence: its prompt size and how much of it came from the cache."""

    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str  # "stop" | "length"


class Runner(Protocol):
    def forward(self, batch: StepBatch, kv: KvCache) -> torch.Tensor: ...


@dataclass(eq=False)
class Sequence:
    params: GenerationParams
    prompt: list[int]
    emit: Callable[[object], None]  # thread-safe: Started, str pieces, then Finished or an exception
    arrival: int = 0
    slot: int | None = None
    computed: int = 0  # tokens whose keys and values are in the slot
    generated: int = 0
    next_token: int = -1  # the sampled token fed at the next decode step
    digests: list[bytes] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    detok: IncrementalDetokenizer | None = None
    stopper: StopChecker | None = None
    rng: torch.Generator | None = None

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def prompt_left(self) -> int:
        return max(0, len(self.prompt) - self.computed)


@dataclass(slots=True)
class CoreStats:
    waiting: int = 0
    running: int = 0
    peak_running: int = 0
    steps: int = 0


class EngineCore:
    def __init__(
        self,
        runner: Runner,
        kv: KvCache,
        decode: Decode,
        eos: set[int],
        *,
        max_step_tokens: int,
        prefix: PrefixIndex | None,
        device: str = "cpu",
    ) -> None:
        self.runner = runner
        self.kv = kv
        self.decode = decode
        self.eos = eos
        self.max_step_tokens = max_step_tokens
        self.prefix = prefix
        self.device = device
        self.stats = CoreStats()
        self._arrivals = itertools.count()
        self._incoming: list[Sequence] = []
        self._waiting: list[tuple[int, int, Sequence]] = []  # heap: (-priority, arrival, seq)
        self._running: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._stopped = threading.Event()

    # ---- the event loop's side -------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            seq.arrival = next(self._arrivals)
            self._incoming.append(seq)
            self.stats.waiting += 1
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # seen at the next step boundary
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask `run` to return, and wait (up to `timeout`) until it has."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._stopped.wait(timeout)

    # ---- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """The decode loop, until `stop`: call it on the thread that built the runner (see `hf`)."""
        try:
            with torch.inference_mode():
                while True:
                    try:
                        if not self._turn():
                            break
                    except Exception as exc:  # a bug, not a sequence's fault: fail what runs, keep serving
                        log.exception("engine turn failed")
                        for seq in self._running:
                            self._fail(seq, exc)
                        self._drop_finished()
            for seq in self._running + [s for _, _, s in self._waiting] + self._incoming:
                self._fail(seq, RuntimeError("worker shutting down"))
        finally:
            self._stopped.set()

    def _turn(self) -> bool:
        with self._wake:
            while not self._incoming and not self._running and not self._waiting and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return False
            for seq in self._incoming:
                heapq.heappush(self._waiting, (-seq.priority, seq.arrival, seq))
            self._incoming.clear()
        self._drop_cancelled()
        self._admit()
        self._update_counts()
        plan = plan_step(self._running, self.max_step_tokens)
        if not plan:  # everything running was cancelled; the next turn waits
            return True
        decoding = sorted(plan.decode, key=lambda s: s.slot or 0)
        batch = StepBatch()
        for seq in decoding:
            assert seq.slot is not None
            batch.add_decode(seq.slot, seq.computed, seq.next_token)
        sampled = list(decoding)
        for seq, count in plan.prefill:
            assert seq.slot is not None
            completes = seq.computed + count == len(seq.prompt)
            batch.add_chunk(seq.slot, seq.computed, seq.prompt[seq.computed : seq.computed + count], completes)
            if completes:
                sampled.append(seq)
        try:
            logits = self.runner.forward(batch, self.kv)
        except Exception as exc:
            joining = [s for s, _ in plan.prefill]
            log.exception("engine step failed (%d decoding, %d joining)", len(decoding), len(joining))
            # The joining sequences are the suspects: fail them; the others retry next step.
            for seq in joining or decoding:
                self._fail(seq, exc)
            self._drop_finished()
            return True
        self.stats.steps += 1
        for seq in decoding:
            seq.computed += 1
        for seq, count in plan.prefill:
            seq.computed += count
            if seq.prompt_left == 0:
                self._remember(seq, seq.digests)
        for row, seq in enumerate(sampled):
            if seq.done or seq.cancelled:
                continue
            try:
                self._accept(seq, sample(logits[row], seq.params.temperature, seq.params.top_p, seq.rng))
            except Exception as exc:
                log.exception("sequence %s failed after its step", seq.params.request_id)
                self._fail(seq, exc)
        self._drop_finished()
        return True

    # ---- admission and leaving --------------------------------------------------

    def _drop_cancelled(self) -> None:
        if any(seq.cancelled for _, _, seq in self._waiting):
            self._waiting = [entry for entry in self._waiting if not entry[2].cancelled]
            heapq.heapify(self._waiting)
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = []
        for seq in self._running:
            if seq.done or seq.cancelled:
                if seq.slot is not None:
                    self.kv.release(seq.slot)
                    seq.slot = None
            else:
                keep.append(seq)
        self._running = keep
        self._update_counts()

    def _admit(self) -> None:
        while self._waiting and self.kv.free_slots:
            _, _, seq = heapq.heappop(self._waiting)
            try:
                self._join(seq)
            except Exception as exc:
                log.exception("sequence %s failed to join", seq.params.request_id)
                if seq.slot is not None:
                    self.kv.release(seq.slot)
                    seq.slot = None
                self._fail(seq, exc)

    def _join(self, seq: Sequence) -> None:
        n = len(seq.prompt)
        if n == 0:
            raise ValueError("empty prompt")
        if n >= self.kv.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the context of {self.kv.max_len} (--max-model-len)")
        seq.slot = self.kv.allocate()
        assert seq.slot is not None
        cached = 0
        if self.prefix is not None:
            seq.digests = block_digests(seq.prompt, self.prefix.block_size)
            blocks = self.prefix.match(seq.digests)
            self.kv.load_blocks(seq.slot, blocks)
            # At least the last prompt token is computed again: its logits pick the first token.
            cached = min(len(blocks) * self.prefix.block_size, n - 1)
            self.prefix.counters.record(n, cached)
        seq.computed = cached
        seq.detok = IncrementalDetokenizer(self.decode)
        seq.stopper = StopChecker(seq.params.stop)
        if seq.params.temperature > 0:
            seq.rng = make_generator(seq.params.seed, self.device)
        self._running.append(seq)
        seq.emit(Started(prompt_tokens=n, cached_tokens=cached))

    def _remember(self, seq: Sequence, digests: list[bytes]) -> None:
        """Copy the slot's KV of these blocks into the prefix cache (those not there yet)."""
        if self.prefix is None or seq.slot is None:
            return
        try:
            self.kv.save_blocks(seq.slot, self.prefix.insert(digests))
        except Exception:  # the cache is an optimisation: never fail a sequence for it
            log.exception("could not save prefix blocks")

    def _remember_output(self, seq: Sequence) -> None:
        """At a normal end: the prompt and the output so far, so the next turn of a chat
        (which repeats this answer after the same prompt) finds them cached."""
        if self.prefix is None or seq.detok is None or seq.computed <= len(seq.prompt):
            return
        with_kv = (seq.prompt + seq.detok.ids)[: seq.computed]
        self._remember(seq, block_digests(with_kv, self.prefix.block_size))

    def _update_counts(self) -> None:
        s = self.stats
        s.waiting = len(self._waiting) + len(self._incoming)
        s.running = len(self._running)
        s.peak_running = max(s.peak_running, s.running)

    # ---- tokens ------------------------------------------------------------------

    def _accept(self, seq: Sequence, token: int) -> None:
        assert seq.detok is not None and seq.stopper is not None
        if token in self.eos:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.next_token = token
        out = seq.stopper.push(seq.detok.push(token))
        if out:
            seq.emit(out)
        if seq.stopper.stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.generated >= seq.params.max_tokens or seq.computed >= self.kv.max_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        assert seq.stopper is not None
        rest = seq.stopper.flush() if flush else ""
        if rest:
            seq.emit(rest)
        self._remember_output(seq)
        seq.done = True
        seq.emit(Finished(reason))

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if not seq.done:
            seq.done = True
            seq.emit(exc)


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    out: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out
