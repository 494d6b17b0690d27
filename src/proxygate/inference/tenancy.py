"""What an API key means for one inference request, from admission to its last token.

`TenantGate.admit` applies the key (its models, else 403; its priority
ceiling; its tenant name and weight for fair share) and reserves its budgets
(429 over budget). The returned `Admission` follows the responses and, when
the request ends however it ends, settles the token budget to the real
count, counts the tenant's tokens and puts the usage in the access log.
Without keys it does nothing but the access-log usage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._pb import inference_pb2
from ..errors import Forbidden
from ..http.message import Request
from ..policy.budgets import Budgets, Reservation
from ..policy.keys import ApiKey
from .metrics import InferenceMetrics
from .routes import estimate_tokens
from .service import GenerationRequest


@dataclass(slots=True)
class Admission:
    req: Request
    gen: GenerationRequest
    metrics: InferenceMetrics
    reservation: Reservation | None
    estimated_prompt_tokens: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done: bool = False

    def observe(self, resp: inference_pb2.TokenResponse) -> None:
        if resp.prompt_tokens:
            self.prompt_tokens = resp.prompt_tokens
        if resp.token_count:
            self.completion_tokens = resp.token_count
        elif resp.token:
            self.completion_tokens += 1

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        # A request that never reached a worker used nothing; one that did
        # but ended before the worker said its prompt size is charged the estimate.
        prompt = self.prompt_tokens or (self.estimated_prompt_tokens if self.completion_tokens else 0)
        if self.reservation is not None:
            self.reservation.settle(prompt + self.completion_tokens)
        tenant = self.gen.tenant
        if tenant:
            self.metrics.tenant_requests.labels(tenant).inc()
            if prompt:
                self.metrics.tenant_tokens.labels(tenant, "prompt").inc(prompt)
            if self.completion_tokens:
                self.metrics.tenant_tokens.labels(tenant, "completion").inc(self.completion_tokens)
        usage = (("prompt_tokens", str(prompt)), ("completion_tokens", str(self.completion_tokens)))
        self.req.log_fields += ((("tenant", tenant),) if tenant else ()) + usage


class TenantGate:
    def __init__(
        self,
        key_of: Callable[[Request], ApiKey | None],
        budgets: Budgets | None,
        metrics: InferenceMetrics,
    ) -> None:
        self.key_of = key_of
        self.budgets = budgets
        self.metrics = metrics

    async def admit(self, req: Request, gen: GenerationRequest) -> Admission:
        key = self.key_of(req)
        gen.client = req.peer_ip
        estimate = estimate_tokens(gen.full_text())
        reservation = None
        if key is not None:
            if not key.may_use(gen.model):
                raise Forbidden(f"key {key.name!r} may not use model {gen.model!r}")
            gen.priority = min(gen.priority, key.max_priority)
            gen.tenant = key.name
            gen.weight = key.weight
            if self.budgets is not None and (key.requests_per_minute or key.tokens_per_minute):
                try:
                    reservation = await self.budgets.reserve(key, estimate + gen.max_tokens)
                except Exception:
                    self.metrics.budget_rejections.labels(key.name).inc()
                    raise
                req.extra_head += reservation.head
        return Admission(req, gen, self.metrics, reservation, estimate)
