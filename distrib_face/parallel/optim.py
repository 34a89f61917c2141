"""The optimizer of a class shard: sparse-row SGD / AdamW whose state is sharded like the weights.

The shard is not data-parallel: nothing averages its gradient over ranks, and each rank steps only its
own rows. With Partial FC sampling only the rows sampled this step are touched: unsampled rows keep
their weights *and* their optimizer state bit for bit (no momentum drift, no weight decay), which a
dense ``torch.optim.SGD`` over the whole shard would not do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distrib_face.parallel.classifier import ShardedMarginClassifier

OPTIMIZERS = ("sgd", "adamw")


class ShardOptimizer(torch.optim.Optimizer):
    """SGD (momentum, weight decay) or AdamW over the rows a :class:`ShardedMarginClassifier` used.

    ``step()`` consumes the gradient (it is modified in place); call ``zero_grad()`` after it.

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
    ) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"shard optimizer must be one of {OPTIMIZERS}, got {name!r}")
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid shard optimizer settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, betas=betas, eps=eps)
        super().__init__([classifier.weight], defaults)
        self.classifier, self.name = classifier, name
        weight = classifier.weight
        k = classifier.num_subcenters
        if name == "sgd":
            self.buffers = {"momentum_buffer": torch.zeros_like(weight)} if momentum > 0 else {}
        else:
            self.buffers = {"exp_avg": torch.zeros_like(weight), "exp_avg_sq": torch.zeros_like(weight)}
        # Per class: how many updates it has had (AdamW's bias correction; useful statistics for SGD too).
        self.row_steps = torch.zeros(weight.shape[0] // k, dtype=torch.int64, device=weight.device)

    # ----------------------------------------------------------------------------------------------
    def _active_grad(self) -> tuple[Tensor | None, Tensor | None]:
        index, rows = self.classifier.active_rows()
        return index, rows.grad

    def unscale_(self, inv_scale: float) -> bool:
        """Multiply the pending gradient by ``inv_scale`` (fp16 loss scaling); returns whether it is finite."""
        _, grad = self._active_grad()
        if grad is None:
            return True
        grad.mul_(inv_scale)
        return bool(torch.isfinite(grad).all())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradient of the shard and of the last sampled rows."""
        self.classifier.weight.grad = None
        if self.classifier._active is not None:
            self.classifier._active[1].grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Update the rows used by the last forward (all rows without sampling)."""
        if closure is not None:
            raise ValueError("ShardOptimizer.step does not take a closure")
        index, grad = self._active_grad()
        if grad is None:
            return
        group = self.param_groups[0]
        weight = self.classifier.weight
        k = self.classifier.num_subcenters
        if index is None:
            rows = None
            self.row_steps += 1
            w, state = weight.data, dict(self.buffers)
            step_counts = self.row_steps
        else:
            rows = (index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)
            self.row_steps[index] += 1
            w = weight.data[rows]
            state = {name: buf[rows] for name, buf in self.buffers.items()}
            step_counts = self.row_steps[index]
        if self.name == "sgd":
            self._sgd(w, grad, state, group)
        else:
            self._adamw(w, grad, state, group, step_counts.repeat_interleave(k).to(w.dtype))
        if rows is not None:
            weight.data[rows] = w
            for name, value in state.items():
                self.buffers[name][rows] = value

    @staticmethod
    def _sgd(w: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        # In place on the gradient (it is consumed here): one pass per line over the rows, which
        # matters when the shard is gigabytes.
        d_p = grad.add_(w, alpha=group["weight_decay"]) if group["weight_decay"] else grad
        if group["momentum"]:
            buf = state["momentum_buffer"]
            torch.add(d_p, buf, alpha=group["momentum"], out=buf)  # buf = momentum * buf + d_p
            d_p = d_p.add_(buf, alpha=group["momentum"]) if group["nesterov"] else buf
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
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        return {
            "name": self.name,
            "param_group": {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()},
            "buffers": {name: buf for name, buf in self.buffers.items()},
            "row_steps": self.row_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict` output of the same optimizer kind and shard shape."""
        if state["name"] != self.name:
            raise ValueError(f"optimizer state is for {state['name']!r}, this shard optimizer is {self.name!r}")
        for name, buf in self.buffers.items():
            if name not in state["buffers"]:
                raise ValueError(f"optimizer state lacks buffer {name!r}")
            src = state["buffers"][name]
            if src.shape != buf.shape:
                raise ValueError(f"optimizer buffer {name!r} has shape {tuple(src.shape)}, shard needs {tuple(buf.shape)}")
            buf.copy_(src)
        self.row_steps.copy_(state["row_steps"])
        group = self.param_groups[0]
        for key, value in state["param_group"].items():
            group[key] = tuple(value) if key == "betas" else value

