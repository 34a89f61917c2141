"""Scalar metrics averaged over ranks between two log points, with a local history for the loss curve.

Every rank calls :meth:`MetricAggregator.update` each step (no host sync: tensors stay tensors) and
:meth:`MetricAggregator.compute` at the log interval - a collective, so all ranks must call it, with the
same metric names. Rank 0 then hands the result to its tracker.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from distrib_face.parallel.collectives import all_reduce_tensor

#: ``reduce_fn(tensor, op)`` reduces a float64 tensor elementwise over the ranks with ``op`` ("sum" or "max");
#: it may work in place (returning None) or return the result.
ReduceFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]


def _key_fingerprint(keys: list[str]) -> float:
    # A 32-bit checksum is exact in float64.
    return float(zlib.crc32("\n".join(keys).encode()))


class MetricAggregator:
    """Averages scalar metrics over steps and ranks, and keeps each metric's (step, value) history.

    For a key ``k`` updated with values ``v_i`` and counts ``c_i`` on every rank since the last compute,
    the result is ``sum(c_i * v_i) / sum(c_i)`` over all those updates of all ranks. Keys listed in
    ``sum_keys`` are summed over ranks instead: each rank's own weighted mean, added over ranks
    (throughput such as img/s).

    Args:
        reduce_fn: ``reduce_fn(tensor, op)`` reduces over ranks with op "sum" or "max". Default:
            :func:`~distrib_face.parallel.collectives.all_reduce_tensor` on ``group`` (which is the identity in
            a world of 1). ``lambda tensor, op: tensor`` is a single process.
        sum_keys: metric names summed over ranks rather than averaged.
        group: the process group for the default ``reduce_fn`` (None: the default group, or a world of 1).
        device: where the packed tensor is reduced ("cpu" for gloo, the rank's CUDA device for NCCL).
    """

    def __init__(
        self,
        reduce_fn: ReduceFn | None = None,
        *,
        sum_keys: Iterable[str] = (),
        group: Any = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self._reduce_fn = reduce_fn
        self._group = group
        self._device = torch.device(device)
        self.sum_keys = frozenset(sum_keys)
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, float] = {}
        self._history: dict[str, list[tuple[int, float]]] = {}

    def update(self, metrics: Mapping[str, torch.Tensor | float], count: float = 1.0) -> None:
        """Add this rank's ``metrics`` (floats or 0-d tensors), each weighted by ``count`` (e.g. batch size)."""
        if count <= 0:
            raise ValueError(f"metric update count must be positive, got {count}")
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
                value = value.detach().reshape(()).to(torch.float64)
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} must be a real number or a tensor, got {type(value).__name__}")
            else:
                value = float(value)
            self._sums[key] = self._sums.get(key, 0.0) + value * count
            self._counts[key] = self._counts.get(key, 0.0) + float(count)

    def compute(self, step: int) -> dict[str, float]:
        """Reduce the metrics gathered since the last call over all ranks, record them at ``step``, reset.

        A collective (two all-reduces: a max over a 4-element header that checks every rank has the same
        metric names, then one sum over all the values), so every rank must call it at the same step.

        Raises:
            RuntimeError: on every rank, when the ranks updated different sets of metric names.
        """
        keys = sorted(self._sums)
        fingerprint = _key_fingerprint(keys)
        # max(x) == -max(-x) over ranks iff all ranks hold the same x; every rank sees the same verdict.
        header = torch.tensor(
            [len(keys), fingerprint, -len(keys), -fingerprint], dtype=torch.float64, device=self._device
        )
        high_keys, high_print, neg_low_keys, neg_low_print = self._reduce(header, "max").cpu().tolist()
        if high_keys != -neg_low_keys or high_print != -neg_low_print:
            self._sums.clear()
            self._counts.clear()
            raise RuntimeError(
                f"ranks updated different metric names before compute(step={step}); this rank has {keys}"
            )
        # Averaged keys contribute their weighted sum, summed keys this rank's own mean.
        values = [
            self._as_tensor(self._sums[key]) / (self._counts[key] if key in self.sum_keys else 1.0) for key in keys
        ]
        counts = [torch.tensor(self._counts[key], dtype=torch.float64, device=self._device) for key in keys]
        # [K values | K counts] - one collective for everything.
        packed = torch.stack(values + counts) if keys else torch.zeros(0, dtype=torch.float64, device=self._device)
        reduced = self._reduce(packed, "sum").cpu().tolist() if keys else []
        num_keys = len(keys)
        result: dict[str, float] = {}
        for index, key in enumerate(keys):
            total, total_count = reduced[index], reduced[num_keys + index]
            result[key] = total if key in self.sum_keys else total / total_count
            self._history.setdefault(key, []).append((int(step), result[key]))
        self._sums.clear()
        self._counts.clear()
        return result

    def _as_tensor(self, value: torch.Tensor | float) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(device=self._device, dtype=torch.float64)
        return torch.tensor(value, dtype=torch.float64, device=self._device)

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        reduce_fn = self._reduce_fn
        if reduce_fn is None:
            group = self._group

            def reduce_fn(tensor: torch.Tensor, op: str) -> torch.Tensor | None:
                return all_reduce_tensor(tensor, op=op, group=group)

        out = reduce_fn(tensor, op)
        return tensor if out is None else out

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Every computed value so far, per metric: ``{"loss": [(step, value), ...]}`` (a copy)."""
        return {key: list(points) for key, points in self._history.items()}

    def state_dict(self) -> dict[str, Any]:
        """The history as JSON-able data, to keep the loss curve whole across a resume."""
        return {"history": {key: [[step, value] for step, value in points] for key, points in self._history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history written by :meth:`state_dict` (pending, un-computed updates are dropped)."""
        self._history = {
            str(key): [(int(step), float(value)) for step, value in points]
            for key, points in state.get("history", {}).items()
        }
        self._sums.clear()
        self._counts.clear()
