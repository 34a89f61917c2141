"""Collectives, with autograd where the classifier needs it.

Every function takes ``group`` (``None``: the default group) and degrades to the identity in a world of
1 or when no process group is initialised. The single-collective forms are used throughout
(``all_gather_single`` / ``reduce_scatter_single``, or their older ``*_tensor`` names).

The gathers accept rows of different counts per rank: they first all-gather the counts, which the host has
to read (one synchronisation). ``equal_sizes=True`` promises that every rank passes the same count (a
trainer's fixed batch): no count exchange, no padding, no host synchronisation. A rank that breaks the
promise makes the collective fail (gloo) or hang (NCCL), so only callers that know set it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distrib_face.parallel.context import group_rank_and_size

# torch >= 2.13 names them *_single and deprecates *_tensor; older releases (the GPU image's 2.11) lack *_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world_size_of(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``group`` (1 without a process group)."""
    return group_rank_and_size(group)[1]


def gather_sizes(
    local_size: int, group: dist.ProcessGroup | None, device: torch.device, equal_sizes: bool = False
) -> list[int]:
    """Every rank's ``local_size``, in rank order (one small all-gather and a host read; none when
    ``equal_sizes``)."""
    world = world_size_of(group)
    if world == 1 or equal_sizes:
        return [local_size] * world
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    everyone = torch.empty(world, dtype=torch.int64, device=device)
    _all_gather_single(everyone, mine, group=group)
    return everyone.tolist()


def _padded_gather(local: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """All-gather rows of different counts: pad to the largest, one all-gather, drop the padding."""
    max_rows = max(sizes)
    if local.shape[0] == max_rows:
        padded = local
    else:
        padded = local.new_zeros((max_rows, *local.shape[1:]))
        padded[: local.shape[0]] = local
    out = local.new_empty((len(sizes) * max_rows, *local.shape[1:]))
    _all_gather_single(out, padded.contiguous(), group=group)
    if all(s == max_rows for s in sizes):
        return out
    return torch.cat([out[r * max_rows: r * max_rows + s] for r, s in enumerate(sizes)])


def all_gather_variable(local: Tensor, group: dist.ProcessGroup | None = None, equal_sizes: bool = False) -> Tensor:
    """Concatenate every rank's ``local`` along dim 0 in rank order (sizes may differ unless ``equal_sizes``;
    no autograd)."""
    if world_size_of(group) == 1:
        return local
    sizes = gather_sizes(local.shape[0], group, local.device, equal_sizes)
    return _padded_gather(local.detach(), sizes, group)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: padded all-gather. Backward: one reduce-scatter (sum over ranks), then this rank's rows."""

    @staticmethod
    def forward(saved: Any, local: Tensor, sizes: list[int], rank: int, group: Any, grad_scale: float) -> Tensor:
        saved.sizes, saved.rank, saved.group, saved.grad_scale = sizes, rank, group, grad_scale
        return _padded_gather(local, sizes, group)

    @staticmethod
    def backward(saved: Any, grad_global: Tensor) -> tuple[Tensor | None, ...]:
        sizes, max_rows = saved.sizes, max(saved.sizes)
        if all(s == max_rows for s in sizes):
            padded = grad_global.contiguous()
        else:
            padded = grad_global.new_zeros((len(sizes) * max_rows, *grad_global.shape[1:]))
            offset = 0
            for r, s in enumerate(sizes):
                padded[r * max_rows: r * max_rows + s] = grad_global[offset: offset + s]
                offset += s
        mine = grad_global.new_empty((max_rows, *grad_global.shape[1:]))
        _reduce_scatter_single(mine, padded, op=dist.ReduceOp.SUM, group=saved.group)
        grad_local = mine[: sizes[saved.rank]]
        if saved.grad_scale != 1.0:
            grad_local = grad_local * saved.grad_scale
        return grad_local, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(saved: Any, tensor: Tensor, scale: float) -> Tensor:
        saved.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(saved: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * saved.scale, None


def scale_grad(tensor: Tensor, scale: float) -> Tensor:
    """``tensor`` unchanged in the forward; its gradient multiplied by ``scale`` in the backward."""
    return _ScaleGrad.apply(tensor, float(scale)) if scale != 1.0 else tensor


def gather_with_grad(
    local: Tensor, group: dist.ProcessGroup | None = None, grad_scale: float = 1.0, equal_sizes: bool = False
) -> Tensor:
    """All-gather rows (sizes may differ per rank unless ``equal_sizes``) so that gradients flow back to
    their owners.

    The backward is a single reduce-scatter: rank r receives the sum over all ranks of the gradient
    with respect to its rows, times ``grad_scale``.
    """
    rank, world = group_rank_and_size(group)
    if world == 1:
        return scale_grad(local, grad_scale)
    sizes = gather_sizes(local.shape[0], group, local.device, equal_sizes)
    return _GatherWithGrad.apply(local.contiguous(), sizes, rank, group, float(grad_scale))


class _AllReduceSumSameGrad(torch.autograd.Function):
    """Sum over ranks whose result feeds a loss every rank computes identically.

    Every rank then holds the same gradient w.r.t. the sum, which is exactly the gradient w.r.t. its own
    addend: the backward is the identity, with no communication.
    """

    @staticmethod
    def forward(saved: Any, tensor: Tensor, group: Any) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(saved: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def all_reduce_sum_replicated_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable all-reduce (sum) for values that feed a loss replicated on every rank."""
    if world_size_of(group) == 1:
        return tensor
    return _AllReduceSumSameGrad.apply(tensor, group)


class _AllReduceSumBothWays(torch.autograd.Function):
    """Sum over ranks whose result feeds *different* computations per rank: the backward sums too."""

    @staticmethod
    def forward(saved: Any, tensor: Tensor, group: Any) -> Tensor:
        saved.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(saved: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=saved.group)
        return out, None


def all_reduce_sum_summed_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable all-reduce (sum) whose backward all-reduces the gradient (identity in a world of 1)."""
    if world_size_of(group) == 1:
        return tensor
    return _AllReduceSumBothWays.apply(tensor, group)


def all_reduce_tensor(tensor: Tensor, op: str = "sum", group: dist.ProcessGroup | None = None) -> Tensor:
    """Reduce ``tensor`` over ranks (``"sum"``, ``"max"``, ``"min"`` or ``"mean"``); returns a new tensor."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}
    if op not in ops:
        raise ValueError(f"all_reduce op must be one of {sorted(ops)}, got {op!r}")
    out = tensor.detach().clone()
    world = world_size_of(group)
    if world > 1:
        dist.all_reduce(out, op=ops[op], group=group)
    if op == "mean":
        out = out / world
    return out


def broadcast_tensors_(tensors: list[Tensor], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, in place (no autograd).

    Every rank passes tensors of the same shapes and dtypes in the same order. One broadcast per dtype:
    the tensors of a dtype are flattened into one buffer, sent, and copied back.
    """
    if world_size_of(group) == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    # the group's rank numbering: ``src`` is a rank of ``group``, broadcast wants the global rank
    global_src = dist.get_global_rank(group, src) if group is not None else src
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        members = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in members])
        dist.broadcast(flat, src=global_src, group=group)
        offset = 0
        with torch.no_grad():
            for tensor in members:
                tensor.copy_(flat[offset: offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Send a small picklable object from rank ``src`` to every rank (our own ranks only, never untrusted)."""
    if world_size_of(group) == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_json(obj: Any, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order (two small all-gathers; ``[obj]`` in a world of 1).

    JSON, not pickle: what comes back is data, whatever another process sent. ``device`` is where the bytes
    travel (the CPU for gloo, the rank's GPU for NCCL).
    """
    if world_size_of(group) == 1:
        return [obj]
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    sizes = gather_sizes(payload.numel(), group, payload.device)
    everyone = all_gather_variable(payload, group).cpu().numpy().tobytes()
    out, start = [], 0
    for size in sizes:
        out.append(json.loads(everyone[start:start + size].decode()))
        start += size
    return out


# ------------------------------------------------------------------------------------------ counting (benchmarks)
#: The collectives :class:`CollectiveCounter` watches, with how much of the payload each rank puts on the wire
#: in the ring / tree algorithms gloo and NCCL use for large messages (W ranks, S the payload of the call as
#: :func:`_payload_bytes` measures it): an all-reduce sends 2 (W-1)/W S (reduce-scatter then all-gather), an
#: all-gather or a reduce-scatter (W-1)/W S, a broadcast at most S.
_WIRE_FACTOR: dict[str, Any] = {
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "all_gather_into_tensor": lambda w: (w - 1) / w,
    "all_gather_single": lambda w: (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
    "reduce_scatter_tensor": lambda w: (w - 1) / w,
    "reduce_scatter_single": lambda w: (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "broadcast": lambda w: 1.0,
}


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _payload_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """The bytes a call is about: the reduced tensor, the gathered output, the scattered input."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("all_gather_into_tensor", "all_gather_single", "all_gather"):
        return _nbytes(kwargs.get("output_tensor", kwargs.get("tensor_list", first)))
    if name in ("reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter"):
        return _nbytes(kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else first)))
    return _nbytes(kwargs.get("tensor", first))


class CollectiveCounter:
    """Counts the calls and bytes of every collective issued while it is active: benchmarks only.

    ``with CollectiveCounter(world_size) as counter: step()`` then ``counter.rows()``. It wraps the functions
    of ``torch.distributed`` (and this module's single-collective aliases, bound at import) for the duration of
    the block, so everything that calls them by name is seen: our collectives, and DeepSpeed's gradient
    all-reduce under ZeRO 0. (DeepSpeed keeps its own references to the all-gather / reduce-scatter functions
    it uses for ZeRO 1-3; the counter wraps those too when DeepSpeed's communication backend exists.) Outside
    the block nothing is wrapped: it costs nothing in training.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = int(world_size)
        self.calls: dict[str, int] = {}
        self.payload: dict[str, int] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr, None)
        if original is None or getattr(original, "_distrib_face_counted", False):
            return

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.payload[name] = self.payload.get(name, 0) + _payload_bytes(name, args, kwargs)
            return original(*args, **kwargs)

        counted._distrib_face_counted = True  # type: ignore[attr-defined]
        setattr(owner, attr, counted)
        self._undo.append((owner, attr, original))

    def __enter__(self) -> "CollectiveCounter":
        import sys

        for name in _WIRE_FACTOR:
            self._wrap(dist, name, name)
        module = sys.modules[__name__]
        self._wrap(module, "_all_gather_single", "all_gather_single")
        self._wrap(module, "_reduce_scatter_single", "reduce_scatter_single")
        deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
        backend = getattr(deepspeed_comm, "cdb", None) if deepspeed_comm is not None else None
        if backend is not None:
            self._wrap(backend, "all_gather_function", "all_gather_into_tensor")
            self._wrap(backend, "reduce_scatter_function", "reduce_scatter_tensor")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()

    def rows(self) -> list[dict[str, Any]]:
        """One row per collective seen: ``name``, ``calls``, ``payload_bytes`` and ``wire_bytes`` (per rank)."""
        factor = {name: f(self.world_size) if self.world_size > 1 else 0.0 for name, f in _WIRE_FACTOR.items()}
        return [{"name": name, "calls": self.calls[name], "payload_bytes": self.payload[name],
                 "wire_bytes": self.payload[name] * factor.get(name, 1.0)} for name in sorted(self.calls)]
