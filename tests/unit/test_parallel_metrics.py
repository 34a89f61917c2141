"""MetricAggregator: weighted means over steps and ranks, sums for throughput, history; world of 1 and 2 gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distrib_face.parallel.metrics import MetricAggregator
from tests.spawn import run_world

# Per rank, per step: (loss, img/s, batch size) - different counts per rank so that a plain mean of means
# would differ from the weighted mean.
UPDATES = {
    0: [(2.0, 100.0, 4), (1.5, 110.0, 4), (1.25, 120.0, 4)],
    1: [(3.0, 90.0, 2), (2.5, 95.0, 2), (1.0, 80.0, 2)],
}


def _reference(ranks):
    """Plain computation: loss weighted by batch size over all updates; img/s = sum over ranks of rank means."""
    losses = [(loss, n) for r in ranks for loss, _, n in UPDATES[r]]
    loss = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    throughput = 0.0
    for r in ranks:
        weighted = [(ips, n) for _, ips, n in UPDATES[r]]
        throughput += sum(v * n for v, n in weighted) / sum(n for _, n in weighted)
    return loss, throughput


def test_world_of_one_weighted_mean_and_history():
    aggregator = MetricAggregator(sum_keys={"img_per_s"})  # default reduce: world of 1, no process group
    for loss, ips, n in UPDATES[0]:
        aggregator.update({"loss": torch.tensor(loss), "img_per_s": ips}, count=n)
    out = aggregator.compute(step=3)
    loss, throughput = _reference([0])
    assert out == pytest.approx({"loss": loss, "img_per_s": throughput}, rel=1e-12)

    aggregator.update({"loss": 0.5, "img_per_s": 10.0})
    aggregator.update({"loss": 0.25, "img_per_s": 30.0})
    assert aggregator.compute(step=6) == pytest.approx({"loss": 0.375, "img_per_s": 20.0})
    assert aggregator.history["loss"] == [(3, pytest.approx(loss)), (6, 0.375)]


def test_identity_reduce_and_state_roundtrip():
    aggregator = MetricAggregator(reduce_fn=lambda tensor, op: tensor)
    values = np.random.default_rng(0).normal(size=20)
    for v in values:
        aggregator.update({"loss": float(v)})
    assert aggregator.compute(step=20)["loss"] == pytest.approx(values.mean(), rel=1e-12)
    assert aggregator.compute(step=21) == {}  # nothing new since the last compute

    restored = MetricAggregator(reduce_fn=lambda tensor, op: tensor)
    restored.load_state_dict(aggregator.state_dict())
    assert restored.history == aggregator.history


def test_rejects_non_scalars():
    aggregator = MetricAggregator(reduce_fn=lambda tensor, op: tensor)
    with pytest.raises(ValueError, match="loss"):
        aggregator.update({"loss": torch.ones(3)})
    with pytest.raises(TypeError, match="name"):
        aggregator.update({"name": "abc"})
    with pytest.raises(ValueError, match="count"):
        aggregator.update({"loss": 1.0}, count=0)


def _aggregate_on_rank(rank, world_size):
    aggregator = MetricAggregator(sum_keys={"img_per_s"})  # default: distrib_face.parallel.collectives
    for loss, ips, n in UPDATES[rank]:
        aggregator.update({"loss": torch.tensor(loss, dtype=torch.float32), "img_per_s": ips}, count=n)
    first = aggregator.compute(step=3)
    aggregator.update({"loss": float(rank)})
    second = aggregator.compute(step=4)
    # Ranks disagreeing on the metric names (same count, or not) must all fail loudly, not mix values up.
    mismatches = []
    for mine in ({"loss": 1.0} if rank == 0 else {"acc": 1.0}, {"loss": 1.0} if rank == 0 else {"loss": 1.0, "acc": 1.0}):
        aggregator.update(mine)
        try:
            aggregator.compute(step=5)
        except RuntimeError as error:
            mismatches.append(str(error))
    return first, second, aggregator.history, mismatches


def test_two_ranks_match_single_process_reference(tmp_path):
    results = run_world(_aggregate_on_rank, world_size=2, tmp_path=tmp_path)
    loss, throughput = _reference([0, 1])
    for first, second, history, mismatches in results:
        assert first == pytest.approx({"loss": loss, "img_per_s": throughput}, rel=1e-6)
        assert second == pytest.approx({"loss": 0.5})
        assert [step for step, _ in history["loss"]] == [3, 4]
        assert len(mismatches) == 2 and all("different metric names" in m for m in mismatches)
