"""Every completion of a run samples from a random stream of its own (actors/generator.py: completion_seed).

vLLM seeds child k of a request with n > 1 as `seed + k`; the scheme this replaced gave group g the base
`seed * 1_000_003 + g`, so completion k of group g+1 replayed completion k+1 of group g. These tests fail on it."""

from __future__ import annotations

from actors.generator import completion_seed


def _old_scheme_streams(seed: int, groups: range, n: int) -> set[int]:
    return {(seed * 1_000_003 + g) % 2**31 + k for g in groups for k in range(n)}


def test_no_two_completions_of_a_run_share_a_stream():
    seed, steps, prompts, n = 0, 5, 64, 8
    groups = range(steps * prompts)  # group ids are step * prompts_per_step + i: unique across the run
    seeds = [completion_seed(seed, g, k) for g in groups for k in range(n)]
    assert len(set(seeds)) == len(seeds) == steps * prompts * n
    # the replaced scheme: a 64 x 8 step had 71 distinct streams, not 512
    assert len(_old_scheme_streams(seed, range(prompts), n)) == 71
    # neighbouring groups: completion k of group g+1 is not completion k+1 of group g
    assert all(completion_seed(seed, g + 1, k) != completion_seed(seed, g, k + 1) for g in range(50) for k in range(7))


def test_seeds_are_reproducible_and_differ_between_run_seeds():
    assert completion_seed(3, 17, 2) == completion_seed(3, 17, 2)
    a = {completion_seed(0, g, k) for g in range(100) for k in range(8)}
    b = {completion_seed(1, g, k) for g in range(100) for k in range(8)}
    assert not a & b
    assert all(0 <= s < 2**63 for s in a)
