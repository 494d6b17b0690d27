"""The hf engine's pure pieces: sampler, detokenizer, stop strings, step planner, prefix index."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

try:
    import torch
except ImportError:
    pytest.fail("the hf engine's tests need torch: ./scripts/install worker,test", pytrace=False)

from proxygate.worker.serving.detokenizer import IncrementalDetokenizer, StopChecker  # noqa: E402
from proxygate.worker.serving.planner import IDLE_BUDGET, MIN_CHUNK, plan_step  # noqa: E402
from proxygate.worker.serving.prefix_cache import PrefixIndex, block_digests  # noqa: E402
from proxygate.worker.serving.sampler import make_generator, sample, top_p_filter  # noqa: E402

# ---- sampler -------------------------------------------------------------------------


def test_greedy_is_argmax_and_needs_no_generator() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, 0.0, 1.0, None) == 1
    assert sample(logits, 0.0, 0.5, make_generator(1)) == 1


def test_same_seed_same_tokens_other_seed_differs() -> None:
    logits = torch.zeros(1000)  # uniform: every draw is the generator's
    draws = [[sample(logits, 1.0, 1.0, rng) for _ in range(20)] for rng in (make_generator(7), make_generator(7))]
    assert draws[0] == draws[1]
    other = [sample(logits, 1.0, 1.0, make_generator(8)) for _ in range(20)]
    assert other != draws[0]


def test_top_p_keeps_the_nucleus_only() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = top_p_filter(probs, 0.7)
    assert kept.tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert top_p_filter(probs, 0.01).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])  # the top token stays
    rng = make_generator(3)
    assert {sample(torch.log(probs), 1.0, 0.7, rng) for _ in range(200)} == {0, 1}


def test_top_p_beyond_the_candidates_is_still_exact() -> None:
    probs = torch.full((4096,), 1 / 4096)  # flat (and exact in binary): the nucleus of 0.5 is 2,048 tokens
    kept = top_p_filter(probs, 0.5)
    assert int((kept > 0).sum()) == 2048


def test_samples_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    rng = make_generator(5)
    draws = [sample(torch.log(probs), 1.0, 1.0, rng) for _ in range(6000)]
    shares = [draws.count(i) / len(draws) for i in range(4)]
    assert shares[3] == 0.0
    assert shares[:3] == pytest.approx([0.5, 0.3, 0.2], abs=0.03)  # fixed seed: the same draws on every run


def test_low_temperature_concentrates_on_the_top_token() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0])
    rng = make_generator(11)
    hot = [sample(logits, 2.0, 1.0, rng) for _ in range(300)]
    cold = [sample(logits, 0.05, 1.0, rng) for _ in range(300)]
    assert len(set(hot)) == 3
    assert set(cold) == {0}


def test_seed_outside_64_bits_is_accepted() -> None:
    make_generator(-1)
    make_generator(2**63 - 1)


# ---- detokenizer and stop strings --------------------------------------------------------

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "\n", 6: "ST", 7: "OP", 8: "!"}


def decode(ids: list[int]) -> str:
    # Token 9 is half of a two-byte character, 10 its second half.
    raw = b"".join(VOCAB[i].encode() if i in VOCAB else {9: b"\xc3", 10: b"\xa9"}[i] for i in ids)
    return raw.decode("utf-8", errors="replace")


def test_incremental_detokenizer_holds_back_split_characters() -> None:
    d = IncrementalDetokenizer(decode)
    assert [d.push(t) for t in (1, 2, 9, 10, 3)] == ["Hel", "lo", "", "é", " wor"]


def run_stop(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    checker = StopChecker(stops)
    out = [checker.push(p) for p in pieces]
    return out, checker.stopped, checker.flush()


def test_stop_string_split_across_tokens_never_leaks() -> None:
    out, stopped, rest = run_stop(["STOP"], ["Hello", " ST", "OP", " more"])
    assert "".join(out) == "Hello " and stopped and rest == ""
    assert "ST" not in "".join(out)


def test_held_back_text_is_released_when_it_cannot_start_a_stop() -> None:
    out, stopped, rest = run_stop(["STOP"], ["Hello", " ST", "ART", " ok"])
    assert not stopped
    assert "".join(out) + rest == "Hello START ok"
    assert out[:2] == ["He", "llo"]  # " ST" might have been the start of STOP: held


def test_flush_releases_the_tail_at_the_end() -> None:
    out, stopped, rest = run_stop(["STOP"], ["abc", "ST"])
    assert not stopped and "".join(out) + rest == "abcST" and rest.endswith("ST")


def test_earliest_of_several_stop_strings_wins() -> None:
    out, stopped, _ = run_stop(["world", "lo w"], ["Hello world"])
    assert stopped and "".join(out) == "Hel"


def test_without_stop_strings_nothing_is_held() -> None:
    out, stopped, rest = run_stop([], ["a", "b"])
    assert out == ["a", "b"] and not stopped and rest == ""


def test_stop_string_inside_one_piece() -> None:
    out, stopped, _ = run_stop(["\n\n"], ["line one\n\nline two"])
    assert out == ["line one"] and stopped


# ---- step planner ----------------------------------------------------------------------


@dataclass
class S:
    name: str
    prompt_left: int
    priority: int = 1
    arrival: int = 0


def test_decodes_always_run_and_prompts_share_the_rest_by_priority() -> None:
    decoding = [S(f"d{i}", 0, arrival=i) for i in range(3)]
    low = S("low", 500, priority=1, arrival=10)
    high = S("high", 40, priority=9, arrival=11)
    plan = plan_step([*decoding, low, high], budget=64)
    assert [s.name for s in plan.decode] == ["d0", "d1", "d2"]
    assert [(s.name, n) for s, n in plan.prefill] == [("high", 40), ("low", 21)]
    assert plan.tokens == 64


def test_a_long_prompt_is_read_in_budget_sized_chunks() -> None:
    seq = S("long", 1500)
    chunks: list[int] = []
    while seq.prompt_left:
        plan = plan_step([seq, S("d", 0)], budget=128)
        ((got, n),) = plan.prefill
        chunks.append(n)
        seq.prompt_left -= n
    assert sum(chunks) == 1500 and max(chunks) == 127


def test_prompts_progress_even_when_decodes_fill_the_budget() -> None:
    plan = plan_step([S(f"d{i}", 0) for i in range(40)] + [S("p", 100)], budget=32)
    assert len(plan.decode) == 40 and plan.prefill[0][1] == MIN_CHUNK


def test_prompts_alone_are_read_in_bigger_chunks() -> None:
    plan = plan_step([S("a", 2000), S("b", 100, arrival=1)], budget=32)
    assert [(s.name, n) for s, n in plan.prefill] == [("a", IDLE_BUDGET)]
    plan = plan_step([S("a", 300), S("b", 100, arrival=1)], budget=32)
    assert [(s.name, n) for s, n in plan.prefill] == [("a", 300), ("b", 100)]


def test_empty_plan_when_nothing_runs() -> None:
    assert not plan_step([], budget=64)


# ---- prefix index ------------------------------------------------------------------------


def test_digests_name_whole_prefixes() -> None:
    a = block_digests(list(range(40)), 16)
    b = block_digests(list(range(32)) + [99] * 8, 16)
    c = block_digests([7] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b  # only full blocks; same first 32 tokens
    assert c[0] != a[0] and c[1] != a[1]  # the second block's tokens match, its prefix does not


def test_match_reuses_and_counts() -> None:
    index = PrefixIndex(capacity_blocks=8, block_size=4)
    first = block_digests(list(range(12)), 4)
    assert index.match(first) == []
    filled = index.insert(first)
    assert [i for i, _ in filled] == [0, 1, 2]
    second = block_digests(list(range(8)) + [50, 51, 52, 53], 4)
    blocks = index.match(second)
    assert blocks == [filled[0][1], filled[1][1]]
    index.counters.record(12, 8)
    index.counters.record(12, 0)
    c = index.counters
    assert (c.queries, c.hits, c.query_tokens, c.hit_tokens) == (2, 1, 24, 8)
    assert [i for i, _ in index.insert(second)] == [2]  # only the new block is filled


def test_eviction_is_lru_and_memory_stays_bounded() -> None:
    index = PrefixIndex(capacity_blocks=4, block_size=2)
    chains = [block_digests([k, k, k + 1, k + 1], 2) for k in range(0, 100, 10)]
    for chain in chains:
        index.insert(chain)
        assert index.used <= 4
    assert index.match(chains[-1]) and index.match(chains[-2])
    assert index.match(chains[0]) == []
    assert index.counters.evictions == 2 * len(chains) - 4


def test_recently_used_prefix_survives_eviction() -> None:
    index = PrefixIndex(capacity_blocks=4, block_size=2)
    hot = block_digests([1, 1, 2, 2], 2)
    index.insert(hot)
    for k in range(10, 60, 10):
        index.match(hot)  # used between every other insertion
        index.insert(block_digests([k, k], 2))
    assert len(index.match(hot)) == 2


def test_parents_outlive_their_children() -> None:
    index = PrefixIndex(capacity_blocks=3, block_size=1)
    index.insert(block_digests([1, 2, 3], 1))
    index.insert(block_digests([9], 1))  # evicts one block: the leaf, not the root
    assert len(index.match(block_digests([1, 2, 3], 1))) == 2


def test_chain_longer_than_the_pool_keeps_its_start() -> None:
    index = PrefixIndex(capacity_blocks=3, block_size=1)
    filled = index.insert(block_digests(list(range(10)), 1))
    assert [i for i, _ in filled] == [0, 1, 2]
    assert len(index.match(block_digests(list(range(10)), 1))) == 3


def test_int4_weights_keep_q4_1_levels_and_switch_to_float16_for_many_rows() -> None:
    """Weights stored as GGUF Q4_1 (per 32 inputs: a minimum plus a step times 0..15, with 0 and 15
    used) are rebuilt from their own levels: the result is the float product up to bfloat16
    rounding; more rows than the int4 kernel pays for take the float16 copy."""
    from proxygate.worker.serving.linear import INT4_DIRECT_ROWS, Float16Packed, Int4Grouped, Wide, int4_available

    if not int4_available():
        pytest.fail("int4 weights need torch's int4 CPU kernel and fbgemm (torch==2.13.0 on x86-64)")
    gen = torch.Generator().manual_seed(7)
    out_features, in_features = 64, 96
    levels = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=gen).float()
    levels[..., 0], levels[..., 1] = 0, 15  # Q4_1 spans each group's minimum to its maximum
    step = torch.rand(out_features, in_features // 32, 1, generator=gen) * 0.02 + 0.001
    low = -torch.rand(out_features, in_features // 32, 1, generator=gen) * 0.1
    weight = (levels * step + low).view(out_features, in_features)
    lin = Int4Grouped(weight, None)
    x = torch.randn(INT4_DIRECT_ROWS, in_features, generator=gen)
    # What the kernel computes from the file's levels, with its bfloat16 activations, scales and
    # output; a level off by one anywhere would move some output by a whole step times an input.
    bf16 = torch.bfloat16
    scale, zero = step.to(bf16).float(), (low + 8 * step).to(bf16).float()
    rebuilt = ((levels - 8) * scale + zero).view(out_features, in_features)
    want = x.to(bf16).float() @ rebuilt.T
    got = lin(x)
    assert torch.allclose(got, want, rtol=2**-7, atol=1e-4), (got - want).abs().max()
    assert lin.nbytes < weight.numel()  # half a byte a weight, plus the groups' scales
    many = torch.randn(INT4_DIRECT_ROWS + 1, in_features, generator=gen)
    assert torch.equal(lin(many), Float16Packed(weight, None)(many))
    # Where bfloat16 GEMMs are the faster (AMX), the copy is bfloat16 instead.
    wide = Int4Grouped(weight, None, wide=True)
    assert torch.equal(wide(x), got) and torch.equal(wide(many), Wide(weight, None)(many))
