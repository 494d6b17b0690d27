#!/usr/bin/env python3
"""The hf engine against transformers' own `generate` on the same weights, in one run.

Each measurement runs in a fresh process of its own (the engine in-process,
through `HfEngine.generate`), on `--threads` torch threads (default 2),
loopback-free (no network at all), bounded in count. A process of its own,
because a process where one thread has run torch's parallel kernels slows
every other thread's (libgomp stops its workers spinning; see
`proxygate.worker.engines.hf`): `generate` run first in the same process
made the engine's decode steps 1.5x slower than they are in a worker.

- baseline: `model.generate` (greedy, 64 new tokens) in bfloat16 and float32,
  best of `--runs`;
- for each engine configuration (`--configs`: default = what `proxygate worker
  --engine hf` runs with no flags (float16 weights on a CPU),
  int8 = `--quantize int8`, int4 = `--quantize int4`, float32):
  - one stream's decode tokens/s (first token to last, 64 tokens; best of runs);
  - 8 concurrent streams' aggregate tokens/s (best of runs);
  - time to first token for a prompt whose 640-token prefix is new (cold) and
    for one whose prefix was just seen (warm), best of runs each;
  - the worst inter-token gap of a running stream while a 1,500-token prompt
    joins, against its median gap;
- int8's and int4's quality: greedy answers to a fixed question set compared with the
  default weights' (float16 on a CPU): identical answers, and the first
  differing token otherwise.

Run: .venv/bin/python bench/engine_bench.py [--runs 3] [--configs default,int8,int4]
On a GPU machine: .venv/bin/python bench/engine_bench.py --device cuda --configs default,int8
(int4 is CPU-only; the engine's CUDA path is plain bfloat16 `F.linear`).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from proxygate.config import WorkerSettings  # noqa: E402
from proxygate.worker.engines import hf_model  # noqa: E402
from proxygate.worker.engines.base import GenerationParams, GenerationResult  # noqa: E402
from proxygate.worker.engines.hf import HfEngine, encode_prompt  # noqa: E402

DECODE_PROMPT = "Write a long poem about the sea."
NEW_TOKENS = 64
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Give a synonym for happy.",
    "What planet is known as the Red Planet?",
    "Translate 'thank you' into Spanish.",
    "How many days are in a leap year?",
    "What gas do plants absorb from the air?",
]
PREFIX = " ".join(
    f"Rule {i}: when a visitor asks about exhibit {i}, answer briefly and mention room {i % 7 + 1}." for i in range(32)
)  # about 640 tokens


def greedy(prompt: str, max_tokens: int = NEW_TOKENS, **kw: object) -> GenerationParams:
    return GenerationParams(request_id="b", model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)  # type: ignore[arg-type]


T = TypeVar("T")


def isolated(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a fresh process (see the module docstring)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---- baseline ----------------------------------------------------------------------


def baseline(dtype: str, threads: int, runs: int, device: str = "cpu") -> float:
    model, tok = hf_model.load("", device, dtype, threads)
    ids = torch.tensor([encode_prompt(tok, greedy(DECODE_PROMPT))], device=device)
    best = 0.0
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, NEW_TOKENS / (time.perf_counter() - start))
    return best


# ---- the engine --------------------------------------------------------------------


async def stream(engine: HfEngine, params: GenerationParams) -> tuple[list[float], str, GenerationResult]:
    """Arrival times of each token (relative to submission), the text, the result."""
    result = GenerationResult()
    start = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    async for piece in engine.generate(params, result):
        times.append(time.perf_counter() - start)
        text.append(piece)
    return times, "".join(text), result


async def measure(settings: WorkerSettings, runs: int) -> dict[str, float]:
    engine = HfEngine(settings)
    await engine.start()
    out: dict[str, float] = {}
    await stream(engine, greedy(DECODE_PROMPT, 8))  # warm-up
    single = []
    for _ in range(runs):
        times, _, _ = await stream(engine, greedy(DECODE_PROMPT, NEW_TOKENS, stop=()))
        single.append((len(times) - 1) / (times[-1] - times[0]))
    out["single tok/s"] = max(single)

    async def many() -> float:
        start = time.perf_counter()
        done = await asyncio.gather(
            *(stream(engine, greedy(f"Write story number {i} about the sea.", NEW_TOKENS)) for i in range(8))
        )
        return sum(len(t) for t, _, _ in done) / (time.perf_counter() - start)

    out["8 streams tok/s"] = max([await many() for _ in range(runs)])

    cold, warm, cached = [], [], 0
    for r in range(runs):
        # A prefix no earlier prompt had (the run number in front), then the same prefix again.
        prefix = f"Museum {r} guide. {PREFIX}"
        times, _, res = await stream(engine, greedy(prefix + " Where is exhibit 3?", 1))
        assert res.cached_tokens <= 32, res  # at most the chat template's default system prompt
        cold.append(times[0])
        times, _, res = await stream(engine, greedy(prefix + " Where is exhibit 9?", 1))
        warm.append(times[0])
        cached = res.cached_tokens
    out["cold TTFT ms"] = min(cold) * 1000
    out["warm TTFT ms"] = min(warm) * 1000
    out["cached tokens"] = cached

    ratios = []
    for r in range(runs):
        # A greedy stream that runs past the join (this prompt does not end early).
        runner = asyncio.create_task(stream(engine, greedy(DECODE_PROMPT, 400)))
        await asyncio.sleep(1.0)  # let it run at its steady pace first
        long_prompt = f"Version {r}. " + (PREFIX + " ") * 2 + PREFIX[:1500]
        started = time.perf_counter()
        _, _, res = await stream(engine, greedy(long_prompt, 1))
        joined = time.perf_counter()
        times, _, _ = await runner
        if len(times) < 400:
            raise SystemExit(f"the running stream ended after {len(times)} tokens, before the join was measured")
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        ratios.append(max(gaps) / statistics.median(gaps))
        out["joining prompt tokens"] = res.prompt_tokens
        out["join time ms"] = (joined - started) * 1000
    out["worst gap / median"] = min(ratios)
    out["worst gap / median (max of runs)"] = max(ratios)
    await engine.aclose()
    return out


def measure_in_process(settings: WorkerSettings, runs: int) -> dict[str, float]:
    return asyncio.run(measure(settings, runs))


def answers_in_process(settings: WorkerSettings) -> list[list[str]]:
    return asyncio.run(answers(settings))


async def answers(settings: WorkerSettings) -> list[list[str]]:
    engine = HfEngine(settings)
    await engine.start()
    out = []
    for q in QUESTIONS:
        pieces: list[str] = []
        async for piece in engine.generate(greedy(q, 24), GenerationResult()):
            pieces.append(piece)
        out.append(pieces)
    await engine.aclose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="default,int8,int4")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: configs default,int8")
    args = parser.parse_args()
    base = WorkerSettings(engine="hf", device=args.device, threads=args.threads, max_concurrency=8, max_model_len=2048)
    configs = {
        "default": base,
        "int8": replace(base, quantize="int8"),
        "int4": replace(base, quantize="int4"),
        "float32": replace(base, dtype="float32"),
    }
    rows: dict[str, dict[str, float]] = {}
    if not args.skip_baseline:
        for dtype in ("bfloat16", "float32"):
            tok_s = isolated(baseline, dtype, args.threads, args.runs, args.device)
            rows[f"generate {dtype}"] = {"single tok/s": tok_s}
            print(f"generate {dtype}: {rows[f'generate {dtype}']}", flush=True)
    for name in args.configs.split(","):
        rows[name] = isolated(measure_in_process, configs[name], args.runs)
        print(f"{name}: {rows[name]}", flush=True)
    ref = rows.get("generate bfloat16", {}).get("single tok/s")
    print(
        "\n| configuration | 1 stream tok/s | x generate bf16 | 8 streams tok/s | x generate bf16 | "
        "TTFT cold / warm (640-token prefix) | speed-up | worst gap / median while 1,500 tokens join |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "8 streams tok/s" not in r:
            print(f"| {name} | {r['single tok/s']:.1f} | {r['single tok/s'] / ref:.2f}x | | | | | |" if ref else "")
            continue
        x1 = f"{r['single tok/s'] / ref:.2f}x" if ref else "-"
        x8 = f"{r['8 streams tok/s'] / ref:.2f}x" if ref else "-"
        print(
            f"| {name} | {r['single tok/s']:.1f} | {x1} | {r['8 streams tok/s']:.1f} | {x8} | "
            f"{r['cold TTFT ms']:.0f} / {r['warm TTFT ms']:.0f} ms ({r['cached tokens']:.0f} cached) | "
            f"{r['cold TTFT ms'] / r['warm TTFT ms']:.1f}x | {r['worst gap / median']:.1f} "
            f"(worst run {r['worst gap / median (max of runs)']:.1f}; {r['joining prompt tokens']:.0f} tokens "
            f"joined in {r['join time ms']:.0f} ms) |"
        )
    quantized = [name for name in args.configs.split(",") if name in ("int8", "int4")]
    plain = isolated(answers_in_process, configs["default"]) if quantized else []
    for name in quantized:
        quant = isolated(answers_in_process, configs[name])
        same = sum(a == b for a, b in zip(plain, quant, strict=True))
        print(f"\n{name} quality: {same}/{len(QUESTIONS)} greedy answers (24 tokens) identical to the default weights'")
        for q, a, b in zip(QUESTIONS, plain, quant, strict=True):
            if a != b:
                first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                print(f"  {q!r}: differs from token {first}: default {''.join(a)!r} / {name} {''.join(b)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
