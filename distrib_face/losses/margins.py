"""Margins: how a classifier turns cosines into logits.

A margin is a small ``nn.Module`` with one contract, used identically by one process holding the whole
classifier and by the class-sharded classifier in :mod:`distrib_face.parallel`:

- ``target_logit(cos_target, ctx) -> logits``: the logit of each row's *target* class from the cosine
  between the row's embedding and its class weight (``[N] -> [N]``). Only the rank that owns the class
  calls it.
- ``negative_logits(cos, ctx) -> logits``: the logits of non-target classes (``[N, C] -> [N, C]``);
  by default ``scale * cos``.
- ``scale``: the logit scale ``s`` (or, with ``normalize_features=False``, the feature norm takes its place).
- ``begin_step(stats)``: called once per training step before any logit, with global (already
  all-reduced) statistics; margins with state (annealing, EMAs) update it here.

Both methods are pure differentiable functions of their inputs, so the gradient of the loss includes the
margin's own derivative (e.g. ArcFace's d cos(theta + m) / d cos(theta)); nothing runs under ``no_grad``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

# acos has an infinite derivative at +-1; margins that need the angle clamp the cosine this far inside.
_ACOS_EPS = 1e-7


@dataclass
class MarginContext:
    """Per-row information a margin may use besides the cosine.

    Attributes:
        feature_norms: ``[N, 1]`` L2 norms of the rows' embeddings (carry gradient); always set when a
            margin method is called.
        labels: ``[N]`` global class labels of the rows.
        target_cos: ``[N]`` cosine of each row's target class (detached), when known.
    """

    feature_norms: Tensor | None = None
    labels: Tensor | None = None
    target_cos: Tensor | None = None

    def rows(self, index: Tensor) -> "MarginContext":
        """The context restricted to rows ``index``."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return MarginContext(pick(self.feature_norms), pick(self.labels), pick(self.target_cos))


@dataclass
class StepStats:
    """Global statistics of one training step, handed to :meth:`Margin.begin_step`.

    Attributes:
        target_cos: ``[B_global]`` detached cosine of every sample's target class (all ranks agree).
        training: whether the classifier is in training mode.
    """

    target_cos: Tensor
    training: bool = True


@dataclass(kw_only=True)
class MarginSpec:
    """A margin by name and hyper-parameters (what configs and checkpoints store).

    Attributes:
        name: registered margin name (see :func:`list_margins`).
        scale: logit scale ``s``.
        multiplicative_margin: ``m1`` (SphereFace's integer m; the combined margin's angle factor).
        angular_margin: ``m2`` (ArcFace's additive angular margin, radians).
        additive_margin: ``m3`` (CosFace's additive cosine margin).
        options: margin-specific extras (e.g. ``easy_margin``, SphereFace's annealing constants).
    """

    name: str = "arcface"
    scale: float = 64.0
    multiplicative_margin: float = 1.0
    angular_margin: float = 0.5
    additive_margin: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in MARGINS:
            raise ValueError(f"unknown margin {self.name!r}; known: {', '.join(list_margins())}")
        if not self.scale > 0:
            raise ValueError(f"margin scale must be > 0, got {self.scale}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON / checkpoint metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MarginSpec":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown margin fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class Margin(nn.Module):
    """Base class: NormFace's plain scaled cosine for every class.

    Subclasses override :meth:`target_logit` (and rarely :meth:`negative_logits`).
    """

    name: ClassVar[str] = "normface"
    #: False: the feature norm ``||x||`` multiplies the cosine instead of ``scale`` (SphereFace, L-Softmax).
    normalize_features: ClassVar[bool] = True
    #: False: class weights are used unnormalised (plain softmax, L-Softmax).
    normalize_weights: ClassVar[bool] = True

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__()
        self.spec = spec
        self.scale = float(spec.scale)

    def multiplier(self, ctx: MarginContext) -> Tensor | float:
        """What multiplies a cosine to make a logit: ``scale``, or the feature norm when not normalised."""
        return self.scale if self.normalize_features else ctx.feature_norms.squeeze(-1)

    def target_logit(self, cos_target: Tensor, ctx: MarginContext) -> Tensor:
        """Logit of each row's target class, ``[N] -> [N]``."""
        return self.multiplier(ctx) * cos_target

    def negative_logits(self, cos: Tensor, ctx: MarginContext) -> Tensor:
        """Logits of non-target classes, ``[N, C] -> [N, C]``."""
        mult = self.multiplier(ctx)
        return mult * cos if isinstance(mult, float) else mult.unsqueeze(-1) * cos

    def begin_step(self, stats: StepStats) -> None:
        """Update state from global statistics once per step (no-op for stateless margins)."""

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


MARGINS: dict[str, type[Margin]] = {}


def register_margin(*names: str) -> Callable[[type[Margin]], type[Margin]]:
    """Class decorator: make a margin creatable by each of ``names``."""

    def decorate(cls: type[Margin]) -> type[Margin]:
        for name in names:
            if name in MARGINS:
                raise ValueError(f"margin name {name!r} registered twice")
            MARGINS[name] = cls
        return cls

    return decorate


def list_margins() -> list[str]:
    """Names accepted by :func:`create_margin`."""
    return sorted(MARGINS)


# Defaults per margin name, so ``create_margin("cosface")`` means the paper's setting.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "normface": dict(scale=64.0, angular_margin=0.0),
    "cosface": dict(scale=64.0, angular_margin=0.0, additive_margin=0.4),
    "amsoftmax": dict(scale=30.0, angular_margin=0.0, additive_margin=0.35),
    "arcface": dict(scale=64.0, angular_margin=0.5),
    "sphereface": dict(scale=64.0, multiplicative_margin=4.0, angular_margin=0.0),
    "combined": dict(scale=64.0, multiplicative_margin=1.0, angular_margin=0.3, additive_margin=0.2),
}


def create_margin(margin: str | MarginSpec | Margin | dict[str, Any], **overrides: Any) -> Margin:
    """Build a margin from a name (paper defaults), a :class:`MarginSpec`, a dict, or pass one through."""
    if isinstance(margin, Margin):
        return margin
    if isinstance(margin, str):
        if margin not in MARGINS:
            raise ValueError(f"unknown margin {margin!r}; known: {', '.join(list_margins())}")
        fields = {**_DEFAULTS.get(margin, {}), **overrides}
        margin = MarginSpec(name=margin, **fields)
    elif isinstance(margin, dict):
        margin = MarginSpec.from_dict({**margin, **overrides})
    elif overrides:
        margin = dataclasses.replace(margin, **overrides)
    return MARGINS[margin.name](margin)


register_margin("normface")(Margin)


@register_margin("cosface", "amsoftmax")
class CosFace(Margin):
    """CosFace / AM-Softmax: ``s (cos theta - m)`` with ``m = additive_margin``."""

    name = "cosface"

    def target_logit(self, cos_target: Tensor, ctx: MarginContext) -> Tensor:
        return self.scale * (cos_target - self.spec.additive_margin)


def _sin_from_cos(cos: Tensor) -> Tensor:
    # sin(theta) >= 0 on [0, pi]; the clamp keeps d sin / d cos = -cos / sin finite at cos = +-1.
    return torch.sqrt(torch.clamp(1.0 - cos * cos, min=1e-12))


@register_margin("arcface")
class ArcFace(Margin):
    """ArcFace: ``s cos(theta + m)``, ``m = angular_margin``.

    ``cos(theta + m) = cos theta cos m - sin theta sin m`` is differentiated exactly
    (``d/d cos theta = cos m + sin m cos theta / sin theta``). Where ``theta + m > pi`` the curve would turn
    back up (a harder sample would get a *larger* logit); there we continue monotonically:

    - ``fallback="continuous"`` (default): ``cos theta - cos(pi - m) - 1``, which meets ``-1`` at
      ``theta = pi - m`` and keeps decreasing with theta;
    - ``fallback="insightface"``: ``cos theta - m sin m`` (arcface_torch's choice; a small jump at the threshold).

    ``options["easy_margin"]``: apply the margin only where ``cos theta > 0`` (the original easy margin).
    """

    name = "arcface"

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        m = float(spec.angular_margin)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"arcface angular_margin must be in [0, pi), got {m}")
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)  # cos theta below this means theta + m > pi
        self.easy_margin = bool(spec.options.get("easy_margin", False))
        fallback = spec.options.get("fallback", "continuous")
        if fallback == "continuous":
            self.fallback_shift = self.threshold + 1.0
        elif fallback == "insightface":
            self.fallback_shift = m * self.sin_m
        else:
            raise ValueError(f"arcface fallback must be 'continuous' or 'insightface', got {fallback!r}")

    def angular_target(self, cos_target: Tensor) -> Tensor:
        """``cos(theta + m)`` with the ``theta + m > pi`` fallback (unscaled)."""
        cos_theta_m = cos_target * self.cos_m - _sin_from_cos(cos_target) * self.sin_m
        if self.easy_margin:
            return torch.where(cos_target > 0, cos_theta_m, cos_target)
        return torch.where(cos_target > self.threshold, cos_theta_m, cos_target - self.fallback_shift)

    def target_logit(self, cos_target: Tensor, ctx: MarginContext) -> Tensor:
        return self.scale * self.angular_target(cos_target)


def chebyshev_cos_multiple(cos: Tensor, m: int) -> Tensor:
    """``cos(m theta)`` as the Chebyshev polynomial ``T_m(cos theta)`` (exact, smooth in ``cos``)."""
    t_prev, t_cur = torch.ones_like(cos), cos
    if m == 0:
        return t_prev
    for _ in range(m - 1):
        t_prev, t_cur = t_cur, 2.0 * cos * t_cur - t_prev
    return t_cur


@register_margin("sphereface")
class SphereFace(Margin):
    """SphereFace / A-Softmax: ``psi(theta) = (-1)^k cos(m theta) - 2k``, ``k = floor(m theta / pi)``.

    ``psi`` is monotonically decreasing on ``[0, pi]`` (plain ``cos(m theta)`` is not). ``m`` is the integer
    ``multiplicative_margin``. As in the paper the target logit is annealed against plain softmax:
    ``(lambda cos theta + psi(theta)) / (1 + lambda)`` with
    ``lambda = max(lambda_min, base (1 + gamma t)^(-power))`` at step ``t`` (options ``lambda_base`` 1000,
    ``lambda_gamma`` 0.12, ``lambda_power`` 1, ``lambda_min`` 5, the Caffe release's values).
    Weights are normalised; features are not (``||x||`` multiplies) unless ``options["normalize_features"]``.
    """

    name = "sphereface"

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        m = spec.multiplicative_margin
        if m != int(m) or m < 1:
            raise ValueError(f"sphereface multiplicative_margin must be a positive integer, got {m}")
        self.m = int(m)
        opts = spec.options
        self.lambda_base = float(opts.get("lambda_base", 1000.0))
        self.lambda_gamma = float(opts.get("lambda_gamma", 0.12))
        self.lambda_power = float(opts.get("lambda_power", 1.0))
        self.lambda_min = float(opts.get("lambda_min", 5.0))
        self.feature_normalized = bool(opts.get("normalize_features", False))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    @property
    def normalize_features(self) -> bool:  # type: ignore[override]
        return self.feature_normalized

    @property
    def lambda_(self) -> float:
        """The current annealing weight of plain softmax."""
        t = float(self.iteration)
        return max(self.lambda_min, self.lambda_base * (1.0 + self.lambda_gamma * t) ** (-self.lambda_power))

    def psi(self, cos: Tensor) -> Tensor:
        """The monotonic ``psi(theta)`` as a function of ``cos theta``."""
        with torch.no_grad():
            theta = torch.acos(cos.clamp(-1.0, 1.0))
            k = torch.floor(self.m * theta / math.pi).clamp(max=self.m - 1)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * chebyshev_cos_multiple(cos, self.m) - 2.0 * k

    def target_logit(self, cos_target: Tensor, ctx: MarginContext) -> Tensor:
        lam = self.lambda_
        blended = (lam * cos_target + self.psi(cos_target)) / (1.0 + lam)
        return self.multiplier(ctx) * blended

    def begin_step(self, stats: StepStats) -> None:
        if stats.training:
            self.iteration += 1


@register_margin("combined")
class CombinedMargin(Margin):
    """insightface's combined margin ``s (cos(m1 theta + m2) - m3)``.

    ``m1 = multiplicative_margin``, ``m2 = angular_margin``, ``m3 = additive_margin``. Where
    ``m1 theta + m2 > pi`` it continues as ``cos theta - cos theta_max - 1 - m3`` with
    ``theta_max = (pi - m2) / m1``: continuous there and decreasing in theta.
    """

    name = "combined"

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        self.m1, self.m2, self.m3 = spec.multiplicative_margin, spec.angular_margin, spec.additive_margin
        if self.m1 <= 0:
            raise ValueError(f"combined multiplicative_margin must be > 0, got {self.m1}")
        theta_max = (math.pi - self.m2) / self.m1
        self.cos_threshold = math.cos(theta_max) if theta_max < math.pi else -1.0

    def target_logit(self, cos_target: Tensor, ctx: MarginContext) -> Tensor:
        theta = torch.acos(cos_target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
        inside = torch.cos(self.m1 * theta + self.m2) - self.m3
        beyond = cos_target - self.cos_threshold - 1.0 - self.m3
        return self.scale * torch.where(cos_target > self.cos_threshold, inside, beyond)
