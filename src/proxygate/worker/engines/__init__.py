"""Token engines behind one interface: `echo` (the seed's mock) and `hf` (a real causal LM)."""

from __future__ import annotations

from ...config import WorkerSettings
from .base import Engine, GenerationParams, GenerationResult
from .echo import EchoEngine

__all__ = ["EchoEngine", "Engine", "GenerationParams", "GenerationResult", "build_engine"]


def build_engine(settings: WorkerSettings) -> Engine:
    models = (settings.model,) if settings.model else ()
    if settings.engine == "echo":
        return EchoEngine(
            models,
            settings.latency,
            settings.max_concurrency,
            prefill_ms_per_token=settings.prefill_ms_per_token,
            prefix_slots=settings.prefix_cache_slots,
        )
    from .hf import HfEngine  # torch and transformers load only for this engine

    return HfEngine(settings)
