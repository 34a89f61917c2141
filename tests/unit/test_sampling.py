"""Partial FC's fixed-shape sampler against exact counts, closed-form probabilities and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from distrib_face.parallel.sampling import (
    INT32_MAX,
    hash32,
    hash32_int,
    new_marker,
    num_draws,
    num_sampled_classes,
    num_slots,
    sample_slots,
    step_keys,
    stream_key,
    uniform_draws,
)


@pytest.mark.parametrize("rate,classes,expected", [
    (0.07, 100, 7),  # 0.07 * 100 is 7.000000000000001 in floats: a plain ceil keeps 8
    (0.1, 1_000_000, 100_000),
    (0.1, 333_334, 33_334),  # ceil(33,333.4)
    (0.14, 100, 14),  # 0.14 * 100 = 14.000000000000002
    (1 / 3, 3, 1),  # the float is just below 1/3: its exact decimal times 3 is below 1
    (0.5, 7, 4),
    (1e-9, 10, 1),  # at least one class
    (1.0, 5, 5),
])
def test_sample_count_rounds_the_decimal_rate_exactly(rate, classes, expected):
    assert num_sampled_classes(rate, classes) == expected


def test_the_float_product_really_picks_up_the_error():
    assert math.ceil(0.07 * 100) == 8 and math.ceil(0.14 * 100) == 15  # why the rule exists


def test_slots_hold_every_positive():
    assert num_slots(100, 64, 1000) == 100  # the usual case: num_sampled
    assert num_slots(3, 10, 8) == 8  # a batch larger than the shard: every class
    assert num_slots(3, 5, 8) == 5


def _exact_shortfall_probability(num_classes: int, needed: int, draws: int) -> float:
    """P(fewer than `needed` distinct values among `draws` uniform draws), by dynamic programming."""
    dist = [1.0] + [0.0] * num_classes  # dist[j]: P(j distinct so far)
    for _ in range(draws):
        new = [0.0] * (num_classes + 1)
        for j, p in enumerate(dist):
            if p:
                new[j] += p * j / num_classes
                if j < num_classes:
                    new[j + 1] += p * (num_classes - j) / num_classes
        dist = new
    return sum(dist[:needed])


@pytest.mark.parametrize("classes,needed", [(20, 10), (20, 20), (50, 5), (12, 11)])
def test_draw_count_bounds_the_shortfall_probability(classes, needed):
    draws = num_draws(classes, needed)
    assert _exact_shortfall_probability(classes, needed, draws) <= 2.0**-60
    # ... and is not wasteful: 30% fewer draws would fail far more often than 2^-60.
    assert _exact_shortfall_probability(classes, needed, int(draws * 0.7)) > 2.0**-60


def test_draw_count_at_scale_is_a_few_percent_over_the_slots():
    assert 1.0 < num_draws(1_000_000, 100_000) / 100_000 < 1.08  # -ln(0.9) / 0.1 = 1.054, plus the margin


def test_hash_on_tensors_equals_the_host_twin():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**32 - 1, 0xDEADBEEF]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [hash32_int(v) for v in values]


def test_uniform_draws_cover_the_range_evenly():
    keys = step_keys(stream_key(7, 0), torch.tensor(3))
    draws = uniform_draws(keys, 200_000, 10, torch.device("cpu"))
    assert int(draws.min()) == 0 and int(draws.max()) == 9
    counts = torch.bincount(draws, minlength=10).double()
    chi2 = float(((counts - 20_000) ** 2 / 20_000).sum())
    assert chi2 < 9 + 6 * math.sqrt(18)  # 9 degrees of freedom: mean 9, sd sqrt(18)
    big = uniform_draws(keys, 1000, 2**31 - 1, torch.device("cpu"))
    assert int(big.min()) >= 0 and int(big.max()) < 2**31 - 1 and len(set(big.tolist())) == 1000


def _sample(classes: int, labels: list[int], owned: list[bool], step: int, slots: int, marker=None, seed=0, rank=0):
    marker = new_marker(classes) if marker is None else marker
    keys = step_keys(stream_key(seed, rank), torch.tensor(step))
    draws = num_draws(classes, slots)
    return sample_slots(marker, torch.tensor(labels), torch.tensor(owned), keys, slots, draws), marker


def test_slots_are_distinct_sorted_hold_the_positives_and_map_each_target():
    labels = [5, 17, 5, 0, 3, 17]
    owned = [True, True, True, True, False, True]  # row 4's class is on another rank
    (slot_class, target_slot, shortfall), marker = _sample(40, labels, owned, step=4, slots=9)
    got = slot_class.tolist()
    assert len(got) == 9 and len(set(got)) == 9 and got == sorted(got)
    assert {5, 17, 0} <= set(got)
    assert not bool(shortfall)
    for row, (label, mine) in enumerate(zip(labels, owned)):
        if mine:
            assert got[int(target_slot[row])] == label
        else:
            assert int(target_slot[row]) == -1
    assert bool((marker == INT32_MAX).all())  # left as found


def test_sampling_is_a_function_of_seed_rank_and_step():
    args = (60, [1, 2], [True, True])
    first = _sample(*args, step=3, slots=10)[0][0]
    assert torch.equal(first, _sample(*args, step=3, slots=10)[0][0])
    assert not torch.equal(first, _sample(*args, step=4, slots=10)[0][0])
    assert not torch.equal(first, _sample(*args, step=3, slots=10, rank=1)[0][0])
    assert not torch.equal(first, _sample(*args, step=3, slots=10, seed=1)[0][0])


def test_negatives_are_a_uniform_sample_of_the_non_positive_classes():
    """Marginals (chi-square) and adjacent-pair co-occurrence against a uniform k-subset of C - p classes."""
    classes, slots, positives, trials = 30, 8, [4, 11, 29], 6000
    marker = new_marker(classes)
    counts = torch.zeros(classes)
    pairs = 0
    for step in range(trials):
        (slot_class, _, _), _ = _sample(classes, positives, [True] * 3, step, slots, marker=marker)
        chosen = torch.zeros(classes, dtype=torch.bool)
        chosen[slot_class] = True
        counts += chosen
        pairs += int((chosen[:-1] & chosen[1:])[[c for c in range(classes - 1) if c not in (3, 4, 10, 11, 28)]].sum())
    assert all(counts[p] == trials for p in positives)
    others = [c for c in range(classes) if c not in positives]
    k, n = slots - len(positives), classes - len(positives)
    expected = trials * k / n
    chi2 = float(((counts[others] - expected) ** 2 / expected).sum())
    dof = n - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)
    # Pairs (c, c + 1) of non-positive classes: a uniform k-subset holds both with probability k(k-1)/(n(n-1)).
    num_pairs = len([c for c in range(classes - 1) if c not in (3, 4, 10, 11, 28)])
    pair_p = k * (k - 1) / (n * (n - 1))
    mean, sd = trials * num_pairs * pair_p, math.sqrt(trials * num_pairs * pair_p * (1 - pair_p) * 3)
    assert abs(pairs - mean) < 6 * sd, (pairs, mean)
