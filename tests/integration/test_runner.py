"""The engine's forward pass against transformers' own, on the real SmolLM2 weights (float32).

The runner fuses projections, interleaves RoPE pairs, reads prompts in
chunks and batches decodes over KV slots: its logits must still be the
model's. Compared with a tolerance, since the operations are not the same
in order (float32 rounding differs in the last bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.test_engines import _require_hf


@pytest.fixture(scope="module")
def model() -> Iterator[tuple[Any, Any]]:
    _require_hf()
    from proxygate.worker.engines import hf_model

    yield hf_model.load("", "cpu", "float32", 2)


@pytest.fixture(scope="module")
def runner_for(model: tuple[Any, Any]) -> Callable[[str], Any]:
    """One runner per weight format for the module (building one takes about 2 s)."""
    from proxygate.worker.serving.runner import LlamaRunner

    built: dict[str, Any] = {}

    def get(weights: str) -> Any:
        if weights not in built:
            built[weights] = LlamaRunner(model[0], device="cpu", weights=weights)
        return built[weights]

    return get


def _kv(runner: Any, slots: int = 4) -> Any:
    import torch

    from proxygate.worker.serving.kv_cache import KvCache

    return KvCache(
        layers=runner.layers_n,
        kv_heads=runner.kv_heads,
        head_dim=runner.head_dim,
        slots=slots,
        max_len=256,
        block_size=16,
        pool_blocks=0,
        dtype=torch.float32,
        device="cpu",
    )


@pytest.mark.parametrize("weights", ["float32", "float16", "int4"])
def test_chunked_prefill_and_batched_decode_match_transformers(
    model: tuple[Any, Any], runner_for: Callable[[str], Any], weights: str
) -> None:
    import torch

    from proxygate.worker.serving.runner import StepBatch

    hf, tok = model
    runner = runner_for(weights)
    kv = _kv(runner)
    prompts = [
        tok("The quick brown fox jumps over the lazy dog because")["input_ids"],
        tok("In 1492, Columbus sailed the ocean blue and")["input_ids"],
    ]
    # Seen: 3e-5, 0.02 (float16 weights: 3 digits) and 0.21 (int4: the file's own 4-bit
    # levels, but bfloat16 activations and scales in the decode step).
    tolerance = {"float32": 5e-4, "float16": 0.1, "int4": 0.5}[weights]
    with torch.inference_mode():
        expected = [hf(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
        # Prompt 0 in slot 2 read in chunks of 5; prompt 1 in slot 0 whole, in the same steps.
        got: dict[int, torch.Tensor] = {}
        done0 = 0
        first = True
        while done0 < len(prompts[0]):
            batch = StepBatch()
            n = min(5, len(prompts[0]) - done0)
            batch.add_chunk(2, done0, prompts[0][done0 : done0 + n], done0 + n == len(prompts[0]))
            if first:
                batch.add_chunk(0, 0, prompts[1], True)
            logits = runner.forward(batch, kv)
            rows = iter(logits)
            if done0 + n == len(prompts[0]):
                got[0] = next(rows)
            if first:
                got[1] = next(rows)
                first = False
            done0 += n
        for i in (0, 1):
            assert torch.allclose(got[i], expected[i], atol=tolerance), (i, (got[i] - expected[i]).abs().max())
        # One decode step for both, batched over slots 0 and 2 (slot 1 is a dummy row).
        nxt = [int(torch.argmax(expected[i])) for i in (0, 1)]
        batch = StepBatch()
        batch.add_decode(0, len(prompts[1]), nxt[1])
        batch.add_decode(2, len(prompts[0]), nxt[0])
        logits = runner.forward(batch, kv)
        for row, i in ((0, 1), (1, 0)):
            want = hf(input_ids=torch.tensor([prompts[i] + [nxt[i]]])).logits[0, -1]
            assert torch.allclose(logits[row], want, atol=tolerance), (i, (logits[row] - want).abs().max())


@pytest.mark.parametrize("weights", ["float16", "int4"])
def test_scripted_decode_step_equals_the_python_one(runner_for: Callable[[str], Any], weights: str) -> None:
    """float16 and int4 weights on a CPU run decode-only steps as one TorchScript call
    (serving/scripted.py): the same operations in the same order, so logits and the KV written
    are equal bit for bit."""
    import torch

    from proxygate.worker.serving.runner import StepBatch

    runner = runner_for(weights)
    assert runner.scripted is not None, "TorchScript did not compile the decode step (see the worker log)"
    kv = _kv(runner)
    with torch.inference_mode():
        for slot, n in ((0, 20), (1, 27), (2, 23)):
            batch = StepBatch()
            batch.add_chunk(slot, 0, list(range(100 + slot, 100 + slot + n)), True)
            runner.forward(batch, kv)

        def step(scripted: bool, rows: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            keys, values = kv.keys.clone(), kv.values.clone()
            compiled = runner.scripted
            runner.scripted = compiled if scripted else None
            try:
                batch = StepBatch()
                for slot, position, token in rows:
                    batch.add_decode(slot, position, token)
                out = (runner.forward(batch, kv), kv.keys.clone(), kv.values.clone())
            finally:
                runner.scripted = compiled
                kv.keys.copy_(keys)
                kv.values.copy_(values)
            return out

        one = [(1, 27, 6)]  # one row: no mask
        three = [(0, 20, 5), (1, 27, 6), (2, 23, 7)]  # rows at different positions: masked
        for rows in (one, three):
            fast, slow = step(True, rows), step(False, rows)
            for a, b in zip(fast, slow, strict=True):
                assert torch.equal(a, b), (rows, (a - b).abs().max())


def test_int4_engine_answers_a_greedy_question() -> None:
    """`--quantize int4` end to end in the engine: built from the settings on its own thread, the
    templated prompt read on the float16 copy, the one-row decode steps on the 4-bit kernel
    through the TorchScript step."""
    import asyncio

    from proxygate.config import WorkerSettings
    from proxygate.worker.engines.base import GenerationParams, GenerationResult
    from proxygate.worker.engines.hf import HfEngine

    _require_hf()

    async def ask() -> tuple[str, GenerationResult, Any]:
        engine = HfEngine(WorkerSettings(engine="hf", quantize="int4", threads=2))
        await engine.start()
        try:
            params = GenerationParams(
                request_id="q", model="m", prompt="What is the capital of France?", max_tokens=20, temperature=0
            )
            result = GenerationResult()
            text = "".join([piece async for piece in engine.generate(params, result)])
            return text, result, engine._core.runner
        finally:
            await engine.aclose()

    text, result, runner = asyncio.run(ask())
    assert "Paris" in text, text
    assert result.finish_reason in ("stop", "length") and result.prompt_tokens > 8
    assert runner.scripted is not None and runner.scripted_rows == 8
