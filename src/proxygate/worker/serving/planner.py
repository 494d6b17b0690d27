"""What the next step computes: the step planner (pure; no tensors).

Every running sequence that is decoding gets its one token. The rest of the
step's token budget (`--max-step-tokens`) goes to sequences still reading
their prompt, highest priority first, in chunks, so a long prompt joins over
several steps and the running streams keep flowing meanwhile (chunked
prefill, as vLLM and SGLang do it). When no sequence is decoding, nobody
waits on the step and prompts are read `IDLE_BUDGET` tokens at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

# A prompt that needs fewer tokens than this is never split just because
# decodes used up most of the budget.
MIN_CHUNK = 16
# With nobody decoding, no stream waits on the step: read prompts in bigger
# chunks (each step reads all weights once, about 25 ms for SmolLM2 on 2 CPU
# threads, so fewer steps make a cold prompt's first token sooner).
IDLE_BUDGET = 512


class Planned(Protocol):
    """What the planner needs to know of a sequence."""

    @property
    def priority(self) -> int: ...
    @property
    def arrival(self) -> int: ...
    @property
    def prompt_left(self) -> int: ...  # prompt tokens not yet in its KV (0: decoding)


S = TypeVar("S", bound=Planned)


@dataclass
class StepPlan(Generic[S]):
    decode: list[S] = field(default_factory=list)
    prefill: list[tuple[S, int]] = field(default_factory=list)  # (sequence, tokens this step)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


def plan_step(running: Sequence[S], budget: int) -> StepPlan[S]:
    plan: StepPlan[S] = StepPlan(decode=[s for s in running if s.prompt_left == 0])
    if not plan.decode:
        budget = max(budget, IDLE_BUDGET)
    left = max(budget - len(plan.decode), MIN_CHUNK)
    reading = sorted((s for s in running if s.prompt_left > 0), key=lambda s: (-s.priority, s.arrival))
    for seq in reading:
        if left <= 0:
            break
        n = min(seq.prompt_left, left)
        plan.prefill.append((seq, n))
        left -= n
    return plan
