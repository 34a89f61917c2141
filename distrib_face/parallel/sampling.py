"""Partial FC sampling with a fixed shape, O(rows used) work and no host synchronisation.

Each training step a rank keeps ``S`` classes of its shard (:func:`num_slots`): every class that is a target
somewhere in the global batch (a *positive*) plus uniformly drawn negatives. The draw is built so that the
whole step has static shapes and never reads a tensor on the host:

1. ``num_draws`` class indices are drawn uniformly *with replacement* from a counter-based hash of
   ``(seed, rank, step, j)`` (:func:`uniform_draws`): O(draws) work, no generator state, the same numbers on
   every device and under ``torch.compile``, so a resumed run repeats its sampling.
2. A persistent ``[C_local + 1]`` int32 *marker* (:func:`new_marker`, 4 bytes per class, allocated once)
   finds first occurrences with one ``scatter_reduce(amin)`` over ``positives ++ draws``: positives get the
   smallest ids, so a class that is both is a positive; a class drawn twice counts once. The touched
   entries are reset afterwards (O(draws)).
3. The distinct positives and the first distinct non-positive draws (ranks from cumulative sums) fill the
   ``S`` slots, which are then put in increasing class order (a sort of ``S`` indices, so that the rows
   are gathered and scattered front to back). Each sample's target slot is read back from the marker.
   No sort or draw over the shard, no ``[C_local]`` temporary, no data-dependent shape.

Because the first ``k`` distinct values of an i.i.d. uniform sequence are a uniform random ``k``-subset, the
negatives are exactly a uniform sample without replacement of the non-positive classes, as with a full
random permutation. ``num_draws`` is chosen so that the draws contain enough distinct classes except with
probability below ``2**-60`` per step (:func:`num_draws`); a shortfall is counted on the device
(``shortfall`` of :func:`sample_slots`), never silently used.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1
_M32 = 0xFFFFFFFF
# Multipliers below 2**31, so that a product with a 32-bit value stays inside int64 (no overflow anywhere).
_MUL1, _MUL2, _GOLDEN32 = 0x7FEB352D, 0x5BD1E995, 0x61C88647
#: The per-step probability bound of drawing too few distinct classes that :func:`num_draws` guarantees.
LOG2_SHORTFALL = 60


def num_sampled_classes(sample_rate: float, num_local_classes: int) -> int:
    """``ceil(sample_rate x C_local)``, clamped to ``[1, C_local]``, with the rate taken as the decimal it prints as.

    A float rate such as 0.07 is stored as 0.07000000000000000666..., so a plain ``ceil(0.07 * 100)`` gives 8.
    The rule here reads the rate as the shortest decimal that round-trips (``repr``), ``7/100``, and multiplies
    exactly (``fractions.Fraction``): rate 0.07 of 100 classes keeps 7, rate 0.1 of 1,000,000 keeps 100,000,
    and a rate that is not a short decimal (``1/3``) is rounded up from its exact decimal expansion.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if num_local_classes < 1:
        raise ValueError(f"num_local_classes must be >= 1, got {num_local_classes}")
    exact = Fraction(repr(float(sample_rate))) * num_local_classes
    return max(1, min(num_local_classes, math.ceil(exact)))


def num_slots(num_sampled: int, global_batch: int, num_local_classes: int) -> int:
    """Classes a sampled step keeps: ``max(num_sampled, min(B_global, C_local))``.

    A static count, so that every positive fits whatever the batch: with ``num_sampled >= B_global`` (the
    usual case) it is exactly ``num_sampled``.
    """
    return max(num_sampled, min(global_batch, num_local_classes))


def _log_shortfall_bound(num_classes: int, needed: int, draws: int) -> float:
    """Natural log of an upper bound on P(fewer than ``needed`` distinct values among ``draws`` uniform draws)."""
    if needed <= 0:
        return -math.inf
    if draws < needed:
        return 0.0
    missed = num_classes - needed + 1  # fewer than `needed` distinct <=> at least `missed` classes never drawn
    # Union bound over the sets of `missed` classes: C(C, missed) (1 - missed / C) ** draws.
    log_union = (math.lgamma(num_classes + 1) - math.lgamma(missed + 1) - math.lgamma(needed)
                 + draws * math.log1p(-missed / num_classes)) if missed < num_classes else -math.inf
    # McDiarmid (each draw moves the distinct count by at most 1): P(D <= E[D] - t) <= exp(-2 t^2 / draws).
    expected = num_classes * -math.expm1(draws * math.log1p(-1.0 / num_classes)) if num_classes > 1 else 1.0
    t = expected - needed + 1
    log_mcdiarmid = -2.0 * t * t / draws if t > 0 else 0.0
    return min(log_union, log_mcdiarmid, 0.0)


def num_draws(num_classes: int, needed: int, log2_failure: int = LOG2_SHORTFALL) -> int:
    """The fewest uniform draws from ``num_classes`` that hold ``needed`` distinct values except with
    probability ``<= 2**-log2_failure`` (about ``-C ln(1 - needed / C)`` plus a few standard deviations:
    1.07 x needed at rate 0.1, 1.4 x at 0.5).
    """
    if needed > num_classes:
        raise ValueError(f"cannot draw {needed} distinct classes out of {num_classes}")
    target = -log2_failure * math.log(2.0)
    lo, hi = max(needed, 1), max(needed, 1)
    while _log_shortfall_bound(num_classes, needed, hi) > target:
        lo, hi = hi, hi * 2
    while lo < hi:  # the bound decreases with the number of draws
        mid = (lo + hi) // 2
        if _log_shortfall_bound(num_classes, needed, mid) > target:
            lo = mid + 1
        else:
            hi = mid
    return hi


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (xor-shift-multiply, two rounds) of int64 tensors holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


def hash32_int(x: int) -> int:
    """:func:`hash32` of one Python integer (the host-side twin, for keys of static values)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int, rank: int, stream: int = 0) -> int:
    """A 32-bit key of ``(seed, rank, stream)``, computed on the host once (static values only)."""
    key = hash32_int(seed & _M32)
    key = hash32_int(key ^ ((seed >> 32) & _M32) ^ 0x5851F42D)
    key = hash32_int(key ^ (rank & _M32) ^ 0x2545F491)
    return hash32_int(key ^ (stream & _M32) ^ 0x1B873593)


def step_keys(base_key: int, step: Tensor) -> tuple[Tensor, Tensor]:
    """Two 32-bit keys (0-d int64 tensors) of ``base_key`` and the step counter ``step`` (a tensor: no sync)."""
    k1 = hash32((step & _M32) ^ base_key)
    k1 = hash32(k1 ^ ((step >> 32) & _M32))
    return k1, hash32(k1 ^ 0x68E31DA4)


def uniform_draws(keys: tuple[Tensor, Tensor], count: int, num_classes: int, device: torch.device) -> Tensor:
    """``[count]`` int64 draws, uniform on ``[0, num_classes)`` to within ``num_classes / 2**64``.

    Draw ``j`` is a hash of ``(keys, j)``: a full :func:`hash32` gives the high 32 bits, one more
    multiply-xorshift of them the low 32, and the 64 bits are mapped onto the range by a multiply-shift
    (Lemire), computed in int64 pieces that never overflow (``num_classes < 2**31``).
    """
    if not 1 <= num_classes < 2**31:
        raise ValueError(f"num_classes must be in [1, 2**31), got {num_classes}")
    j = torch.arange(count, dtype=torch.int64, device=device)  # [count]
    hi = hash32(((j * _GOLDEN32) & _M32) ^ keys[0])
    lo = ((hi ^ keys[1]) * _MUL1) & _M32
    lo ^= lo >> 15
    # floor(((hi << 32) + lo) * C / 2**64) = floor((hi * C + floor(lo * C / 2**32)) / 2**32)
    return (hi * num_classes + ((lo * num_classes) >> 32)) >> 32


def new_marker(num_local_classes: int, device: torch.device | str | None = None) -> Tensor:
    """The persistent ``[C_local + 1]`` int32 marker of :func:`sample_slots` (the last entry absorbs rows that
    other ranks own). Allocated once per shard; every call of :func:`sample_slots` leaves it as it found it.
    """
    return torch.full((int(num_local_classes) + 1,), INT32_MAX, dtype=torch.int32, device=device)


def sample_slots(
    marker: Tensor, local_target: Tensor, owned: Tensor, keys: tuple[Tensor, Tensor], slots: int, draws: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick ``slots`` distinct local classes: every owned positive, and uniform negatives for the rest.

    Args:
        marker: :func:`new_marker` of this shard (on the device of ``local_target``).
        local_target: ``[B]`` int64 local class of each global sample (any value where not owned).
        owned: ``[B]`` bool, the sample's class is on this rank.
        keys: :func:`step_keys` of this step.
        slots: ``S`` from :func:`num_slots` (``<= C_local``).
        draws: :func:`num_draws` for ``(C_local, S)``.

    Returns:
        ``slot_class`` ``[S]`` int64 (distinct local classes, increasing), ``target_slot`` ``[B]`` int64 (the
        slot of each owned sample's class, ``-1`` elsewhere) and ``shortfall`` (0-d bool: fewer than ``S``
        distinct classes were drawn, which :func:`num_draws` makes rarer than ``2**-60`` per step).
    """
    num_rows, trash = local_target.shape[0], marker.shape[0] - 1
    device = local_target.device
    positives = torch.where(owned, local_target, trash)  # [B]
    negatives = uniform_draws(keys, draws, trash, device)  # [draws]
    classes = torch.cat([positives, negatives])  # [B + draws]
    ids = torch.arange(num_rows + draws, dtype=torch.int32, device=device)  # positives first: they win
    marker.scatter_reduce_(0, classes, ids, reduce="amin", include_self=True)
    first_id = marker.gather(0, classes)  # [B + draws]: the smallest id that named each class
    marker.index_fill_(0, classes, INT32_MAX)  # leave the marker as found (O(B + draws))
    first = first_id == ids
    pos_first = first[:num_rows] & owned
    neg_first = first[num_rows:]
    pos_rank = torch.cumsum(pos_first, 0) - 1  # [B] slot of each distinct positive
    num_pos = pos_first.sum()
    neg_slot = torch.cumsum(neg_first, 0) - 1 + num_pos  # [draws]
    dest = torch.cat([
        torch.where(pos_first, pos_rank, slots),
        torch.where(neg_first & (neg_slot < slots), neg_slot, slots),
    ])
    slot_class = torch.zeros(slots + 1, dtype=torch.int64, device=device)  # [S + 1]; the last one is a dump
    slot_class.scatter_(0, dest, classes)
    shortfall = num_pos + neg_first.sum() < slots
    # The first sample naming a class holds that class's slot; the others find it through first_id.
    first_row = first_id[:num_rows].to(torch.int64).clamp(max=max(num_rows - 1, 0))
    target_slot = torch.where(owned, pos_rank.gather(0, first_row), 0)
    # Slots in increasing class order: the shard's rows are then gathered and scattered front to back
    # (about 1.3x faster than in random order on the CPU). A sort of S indices, not of the shard.
    sorted32, order = slot_class[:slots].to(torch.int32).sort()  # int32 keys sort ~2x faster (C_local < 2**31)
    slot_class = sorted32.to(torch.int64)
    new_position = torch.empty_like(order).scatter_(0, order, torch.arange(slots, device=device))
    target_slot = torch.where(owned, new_position.gather(0, target_slot), -1)
    return slot_class, target_slot, shortfall
