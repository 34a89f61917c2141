"""The optimizer of a class shard: sparse-row SGD / AdamW whose state is sharded like the weights.

The shard is not data-parallel: nothing averages its gradient over ranks, and each rank steps only its
own rows. With Partial FC sampling only the rows sampled this step are touched: unsampled rows keep
their weights *and* their optimizer state bit for bit (no momentum drift, no weight decay), which a
dense ``torch.optim.SGD`` over the whole shard would not do.

Cost follows the rows used. A sampled step gathers the state of its ``S`` rows into preallocated buffers
(``index_select(out=)``), updates them together with the classifier's row buffer in place (SGD: one fused
pass, ``torch._fused_sgd_``), and writes both back with ``index_copy_``: ``O(S x D)`` work, no temporary of
the shard's size, no host synchronisation.

Low-precision storage (bf16 weights and state): the update runs in float32 on chunks of rows, and the
results are written back with *stochastic rounding* (``rounding="stochastic"``, the default): each value
rounds up with probability equal to its distance from the lower bf16 neighbour, so updates smaller than
half a bf16 step (2**-9 relative) survive in expectation instead of being lost. ``rounding="nearest"`` is
kept for the comparison in docs/classifier.md. The noise comes from a generator seeded by
``(seed, rank, optimizer step)``: a resumed run rounds as the original did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distrib_face.parallel.classifier import ShardedMarginClassifier
from distrib_face.parallel.rows import gather_rows, scatter_rows_
from distrib_face.parallel.sampling import hash32_int, stream_key
from distrib_face.parallel.shard import advise_huge_pages

OPTIMIZERS = ("sgd", "adamw")
ROUNDINGS = ("stochastic", "nearest")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: Elements per chunk of the float32 update of low-precision rows (bounds its temporaries: 4 x 64 MB).
UPDATE_CHUNK_ELEMENTS = 1 << 24


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator) -> Tensor:
    """Write float32 ``src`` into bfloat16 ``dst`` rounding up with probability = the discarded fraction.

    Adds 16 uniform random bits below bf16's last mantissa bit and truncates (``src`` is overwritten);
    the sign-magnitude layout makes this symmetric for negative values. Infinities stay infinite, NaN NaN.
    """
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32:
        raise ValueError(f"stochastic rounding writes float32 into bfloat16, got {src.dtype} -> {dst.dtype}")
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    bits = src.view(torch.int32)
    bits.add_(noise).bitwise_and_(-65536)  # clear the 16 bits bf16 drops: the copy below is exact
    return dst.copy_(src)


class ShardOptimizer(torch.optim.Optimizer):
    """SGD (momentum, weight decay) or AdamW over the rows a :class:`ShardedMarginClassifier` used.

    ``step()`` consumes the gradient; call ``zero_grad()`` after it.

    It subclasses ``torch.optim.Optimizer`` so torch LR schedulers drive ``param_groups[0]["lr"]``.

    Args:
        classifier: the shard to optimise.
        name: ``"sgd"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum (torch.optim.SGD semantics, no dampening).
        weight_decay: L2 (SGD: added to the gradient) or decoupled (AdamW) weight decay.
        nesterov: SGD Nesterov momentum.
        betas, eps: AdamW constants. Bias correction uses a per-row step count, since rows are updated
            only on the steps they are sampled.
        rounding: how float32 results go back into low-precision (bf16) storage: ``"stochastic"`` or
            ``"nearest"``. Ignored for float32 / float64 storage.
    """

    def __init__(
        self,
        classifier: ShardedMarginClassifier,
        name: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rounding: str = "stochastic",
    ) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"shard optimizer must be one of {OPTIMIZERS}, got {name!r}")
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid shard optimizer settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, betas=betas, eps=eps)
        super().__init__([classifier.weight], defaults)
        self.classifier, self.name, self.rounding = classifier, name, rounding
        weight = classifier.weight
        k = classifier.num_subcenters
        pin = classifier.offload == "host" and classifier.device.type == "cuda"

        def zeros() -> Tensor:  # state lives with the shard: on the device, or in (pinned) host memory
            if pin:
                return torch.zeros_like(weight).pin_memory()
            buf = torch.empty_like(weight)
            advise_huge_pages(buf)  # scattered rows are read and written each step (see shard.py)
            return buf.zero_()

        if name == "sgd":
            self.buffers = {"momentum_buffer": zeros()} if momentum > 0 else {}
        else:
            self.buffers = {"exp_avg": zeros(), "exp_avg_sq": zeros()}
        if classifier.offload == "host":
            classifier.attach_offloaded_state(self.buffers)  # its rows then come with each plan's weight rows
        # Per class: how many updates it has had (AdamW's bias correction; useful statistics for SGD too).
        self.row_steps = torch.zeros(weight.shape[0] // k, dtype=torch.int64, device=weight.device)
        #: Optimizer steps taken (a host counter: it seeds the stochastic rounding of each step).
        self.num_steps = 0
        self._row_state: dict[str, Tensor] = {}  # preallocated [rows in use, D] state rows on the device

    # ----------------------------------------------------------------------------------------------
    def _active_grad(self) -> tuple[Tensor | None, Tensor | None]:
        index, rows = self.classifier.active_rows()
        return index, rows.grad

    def unscale_(self, inv_scale: float) -> Tensor:
        """Multiply the pending gradient by ``inv_scale`` (fp16 loss scaling).

        Returns:
            A 0-d bool tensor, whether the gradient is finite (no host synchronisation here: the trainer
            reads it where it decides to skip the step).
        """
        _, grad = self._active_grad()
        if grad is None:
            return torch.ones((), dtype=torch.bool, device=self.classifier.device)
        grad.mul_(inv_scale)
        return torch.isfinite(grad).all()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradient of the shard and of the last rows in use."""
        self.classifier.weight.grad = None
        if self.classifier._active is not None:
            self.classifier._active[1].grad = None

    def _ones(self, index: Tensor) -> Tensor:
        ones = self._row_state.get("_ones")
        if ones is None or ones.shape != index.shape:
            ones = torch.ones(index.shape, dtype=torch.int64, device=index.device)
            self._row_state["_ones"] = ones
        return ones

    def _state_rows(self, name: str, like: Tensor) -> Tensor:
        buf = self._row_state.get(name)
        if buf is None or buf.shape != like.shape:
            buf = torch.empty_like(like, requires_grad=False)
            self._row_state[name] = buf
        return buf

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Update the rows used by the last forward (all rows without sampling)."""
        if closure is not None:
            raise ValueError("ShardOptimizer.step does not take a closure")
        index, grad = self._active_grad()
        if grad is None:
            return
        clf = self.classifier
        group = self.param_groups[0]
        weight = clf.weight
        _, rows_in_use = clf.active_rows()
        k = clf.num_subcenters
        self.num_steps += 1
        generator = None
        if weight.dtype in _LOW_PRECISION and self.rounding == "stochastic":
            generator = torch.Generator(device=rows_in_use.device)
            key = hash32_int(stream_key(clf.seed, clf.rank, stream=1) ^ hash32_int(self.num_steps))
            generator.manual_seed(key << 16 | self.num_steps & 0xFFFF)
        if index is None:
            self.row_steps += 1
            counts = self.row_steps
        else:
            self.row_steps.index_add_(0, index, self._ones(index))  # the slots are distinct classes
            counts = self.row_steps.index_select(0, index) if self.name == "adamw" else None
        if rows_in_use is weight:
            # In-device, no sampling: the shard and its state in place.
            w, state = weight.data, dict(self.buffers)
        else:
            # The classifier's row buffer holds the current rows; gather the state rows beside it.
            w = rows_in_use.data
            row_index = clf.active_row_index()
            state = {}
            for name, buf in self.buffers.items():
                prefetched = clf.prefetched_state(name) if clf.offload == "host" else None
                if prefetched is not None and prefetched.shape == w.shape:
                    state[name] = prefetched  # staged and copied by the plan, beside the weight rows
                    continue
                rows = self._state_rows(name, w)
                if clf.offload == "host":
                    rows.copy_(clf.stage_rows(name, buf, row_index), non_blocking=True)
                else:
                    gather_rows(buf, row_index, rows)
                state[name] = rows
        steps = None
        if self.name == "adamw":
            steps = counts.to(w.device).repeat_interleave(k) if k > 1 else counts.to(w.device)
        self._update(w, grad, state, group, steps, generator)
        if rows_in_use is not weight:
            row_index = clf.active_row_index()
            targets = [("weight", weight, w)] + [(name, self.buffers[name], rows) for name, rows in state.items()]
            for name, host, rows in targets:
                if clf.offload == "host":
                    clf.schedule_writeback(name, host.data, row_index, rows)
                elif row_index is None:
                    host.data.copy_(rows)
                else:
                    scatter_rows_(host.data, row_index, rows)

    # ----------------------------------------------------------------------------------------------
    def _update(self, w: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict[str, Any],
                steps: Tensor | None, generator: torch.Generator | None) -> None:
        """One update of rows ``w`` (and their ``state``) in place; low-precision rows via float32 chunks."""
        if w.dtype not in _LOW_PRECISION:
            self._apply(w, grad, state, group, steps)
            return
        rows_per_chunk = max(1, UPDATE_CHUNK_ELEMENTS // max(1, w.shape[1]))
        for r0 in range(0, w.shape[0], rows_per_chunk):
            r1 = min(r0 + rows_per_chunk, w.shape[0])
            w32 = w[r0:r1].float()
            state32 = {name: buf[r0:r1].float() for name, buf in state.items()}
            self._apply(w32, grad[r0:r1].float(), state32, group, None if steps is None else steps[r0:r1])
            for dst, src in [(w[r0:r1], w32)] + [(state[n][r0:r1], state32[n]) for n in state]:
                if generator is not None and dst.dtype == torch.bfloat16:
                    stochastic_round_(dst, src, generator)
                else:
                    dst.copy_(src)

    def _apply(self, w: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict[str, Any],
               steps: Tensor | None) -> None:
        if self.name == "sgd":
            self._sgd(w, grad, state, group)
        else:
            self._adamw(w, grad, state, group, steps.to(w.dtype))

    @staticmethod
    def _sgd(w: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        if group["momentum"]:
            # One fused pass (torch.optim.SGD's fused kernel, on CPU and CUDA): reads w, grad and the
            # momentum once and writes w and the momentum once. The buffer starts at 0, so its first step
            # equals torch.optim.SGD's clone of the gradient.
            torch._fused_sgd_(
                [w], [grad], [state["momentum_buffer"]], weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=group["nesterov"],
                maximize=False, is_first_step=False,
            )
            return
        d_p = grad.add(w, alpha=group["weight_decay"]) if group["weight_decay"] else grad
        w.add_(d_p, alpha=-group["lr"])

    @staticmethod
    def _adamw(w: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict[str, Any], steps: Tensor) -> None:
        beta1, beta2 = group["betas"]
        w.mul_(1.0 - group["lr"] * group["weight_decay"])
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias1 = 1.0 - beta1 ** steps[:, None]
        bias2_sqrt = torch.sqrt(1.0 - beta2 ** steps[:, None])
        denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(group["eps"])
        w.addcdiv_(state["exp_avg"] / bias1, denom, value=-group["lr"])

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Hyper-parameters and the sharded state tensors (rows of this shard only)."""
        self.classifier.flush()
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        return {
            "name": self.name,
            "param_group": {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()},
            "buffers": {name: buf for name, buf in self.buffers.items()},
            "row_steps": self.row_steps,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict` output of the same optimizer kind and shard shape (any storage dtype)."""
        if state["name"] != self.name:
            raise ValueError(f"optimizer state is for {state['name']!r}, this shard optimizer is {self.name!r}")
        self.classifier.flush()
        for name, buf in self.buffers.items():
            if name not in state["buffers"]:
                raise ValueError(f"optimizer state lacks buffer {name!r}")
            src = state["buffers"][name]
            if src.shape != buf.shape:
                raise ValueError(f"optimizer buffer {name!r} has shape {tuple(src.shape)}, shard needs {tuple(buf.shape)}")
            buf.copy_(src)
        self.row_steps.copy_(state["row_steps"])
        self.num_steps = int(state.get("num_steps", 0))
        group = self.param_groups[0]
        for key, value in state["param_group"].items():
            group[key] = tuple(value) if key == "betas" else value
