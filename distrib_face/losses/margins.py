"""Margins: how a classifier turns cosines into logits.

A margin is a small ``nn.Module`` with one contract, used identically by one process holding the whole
classifier and by the class-sharded classifier in :mod:`distrib_face.parallel`:

- ``target_logit(cos_target, mctx) -> logits``: the logit of each row's *target* class from the cosine
  between the row's embedding and its class weight (``[N] -> [N]``). Only the rank that owns the class
  calls it.
- ``negative_logits(cos, mctx) -> logits``: the logits of non-target classes (``[N, C] -> [N, C]``);
  by default ``scale * cos``. Inter-class filtering (option ``interclass_filtering_threshold``) is applied
  here for every margin; subclasses override :meth:`Margin.negative_from_cos` instead.
- ``scale``: the logit scale ``s`` (or, with ``normalize_features=False``, the feature norm takes its place).
- ``begin_step(stats)``: called once per forward before any logit, with global (already all-reduced)
  statistics; margins with state (annealing, EMAs, adaptive scales) update it here, in training mode only.

Flags the classifier reads (class attributes, or instance attributes where an option sets them):

- ``normalize_features`` / ``normalize_weights``: whether ``||x||`` / ``||W_j||`` are divided out of the
  logit (when weights are not normalised, the "cosine" handed to a margin is ``x_unit . W_j`` and carries the
  weight norm; ``mctx.weight_norms`` holds the target's ``||W_y||``);
- ``uses_bias``: the classifier appends a constant-1 feature so that each class row gets a bias column;
- ``needs_negative_stats``: the classifier runs a no-grad pass over every class chunk before
  :meth:`Margin.begin_step` and hands over ``log sum_{i, j != y_i} exp(negative logit_ij)`` (all-reduced);
- ``num_subcenters``: ``K`` rows per class (sub-centre ArcFace).

Both methods are pure differentiable functions of their inputs, so the gradient of the loss includes the
margin's own derivative (e.g. ArcFace's d cos(theta + m) / d cos(theta)); nothing runs under ``no_grad``
except piecewise-constant selections (SphereFace's ``k``, CurricularFace's hard-negative mask) and
statistics that the papers define as constants of the step.
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
        row_index: ``[N]`` position of each row in the global batch (``None``: rows are the whole global
            batch in order). Margins with per-sample state (ElasticFace) index it with this.
        weight_norms: ``[N]`` norm of each row's target class weight (carries gradient); set for
            :meth:`Margin.target_logit` by the classifier.
    """

    feature_norms: Tensor | None = None
    labels: Tensor | None = None
    target_cos: Tensor | None = None
    row_index: Tensor | None = None
    weight_norms: Tensor | None = None

    def rows(self, index: Tensor) -> "MarginContext":
        """The context restricted to rows ``index``."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        row_index = index if self.row_index is None else self.row_index[index]
        return MarginContext(
            pick(self.feature_norms), pick(self.labels), pick(self.target_cos), row_index, pick(self.weight_norms)
        )


@dataclass
class StepStats:
    """Global statistics of one training step, handed to :meth:`Margin.begin_step`.

    Attributes:
        target_cos: ``[B_global]`` detached cosine of every sample's target class (all ranks agree).
        training: whether the classifier is in training mode.
        feature_norms: ``[B_global]`` detached embedding norms of the whole global batch (AdaFace).
        negative_logsumexp: 0-d tensor, ``log sum_i sum_{j != y_i} exp(negative_logits_ij)`` over the global
            batch and every (sampled) class, computed with the margin's state *before* this step; set only
            for margins with ``needs_negative_stats`` (AdaCos).
    """

    target_cos: Tensor
    training: bool = True
    feature_norms: Tensor | None = None
    negative_logsumexp: Tensor | None = None


@dataclass(kw_only=True)
class MarginSpec:
    """A margin by name and hyper-parameters (what configs and checkpoints store).

    Attributes:
        name: registered margin name (see :func:`list_margins`).
        scale: logit scale ``s``.
        multiplicative_margin: ``m1`` (SphereFace's integer m; the combined margin's angle factor).
        angular_margin: ``m2`` (ArcFace's additive angular margin, radians).
        additive_margin: ``m3`` (CosFace's additive cosine margin).
        options: margin-specific extras (e.g. ``easy_margin``, SphereFace's annealing constants); unknown
            keys raise ``ValueError`` when the margin is built.
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

    Subclasses override :meth:`target_logit` (and rarely :meth:`negative_from_cos`).

    Options every margin accepts: ``interclass_filtering_threshold`` (float in (0, 1]; negatives whose
    cosine exceeds it are set to cosine 0, Partial FC's defence against the same identity under two labels).
    """

    name: ClassVar[str] = "normface"
    #: Option keys this class reads (the union over the class hierarchy is accepted).
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"interclass_filtering_threshold"})
    #: False: the feature norm ``||x||`` multiplies the cosine instead of ``scale`` (SphereFace, L-Softmax).
    normalize_features: ClassVar[bool] = True
    #: False: class weights are used unnormalised (plain softmax, L-Softmax).
    normalize_weights: ClassVar[bool] = True
    #: True: the classifier gives every class row a bias (a constant-1 feature column).
    uses_bias: bool = False
    #: True: the classifier computes ``StepStats.negative_logsumexp`` before :meth:`begin_step`.
    needs_negative_stats: ClassVar[bool] = False
    #: Rows per class in the classifier (sub-centres); the classifier's default when it is not given.
    num_subcenters: int = 1

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__()
        allowed: set[str] = set()
        for klass in type(self).__mro__:
            allowed |= set(getattr(klass, "OPTIONS", ()))
        unknown = set(spec.options) - allowed
        if unknown:
            raise ValueError(f"margin {spec.name!r}: unknown options {sorted(unknown)}; known: {sorted(allowed)}")
        self.spec = spec
        self.scale = float(spec.scale)
        self.num_classes: int | None = None
        threshold = spec.options.get("interclass_filtering_threshold")
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"margin {spec.name!r}: interclass_filtering_threshold must be in [0, 1], got {threshold}")
        # 0 (arcface_torch's "off") and None both disable the filter.
        self.interclass_threshold = float(threshold) if threshold else None

    def set_num_classes(self, num_classes: int) -> None:
        """Told once by the classifier: the total number of classes ``C`` (AdaCos's fixed scale needs it)."""
        self.num_classes = int(num_classes)

    def multiplier(self, mctx: MarginContext) -> Tensor | float:
        """What multiplies a cosine to make a logit: ``scale``, or the feature norm when not normalised."""
        return self.scale if self.normalize_features else mctx.feature_norms.squeeze(-1)

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        """Logit of each row's target class, ``[N] -> [N]``."""
        return self.multiplier(mctx) * cos_target

    def filter_negatives(self, cos: Tensor) -> Tensor:
        """Inter-class filtering: negatives with cosine above the threshold become cosine 0 (no gradient)."""
        if self.interclass_threshold is None:
            return cos
        return cos.masked_fill(cos.detach() > self.interclass_threshold, 0.0)

    def negative_logits(self, cos: Tensor, mctx: MarginContext) -> Tensor:
        """Logits of non-target classes, ``[N, C] -> [N, C]`` (filtered, then :meth:`negative_from_cos`)."""
        return self.negative_from_cos(self.filter_negatives(cos), mctx)

    def negative_from_cos(self, cos: Tensor, mctx: MarginContext) -> Tensor:
        """The margin's own non-target transform, ``[N, C] -> [N, C]`` (default ``multiplier * cos``)."""
        mult = self.multiplier(mctx)
        return mult * cos if isinstance(mult, float) or mult.ndim == 0 else mult.unsqueeze(-1) * cos

    def begin_step(self, stats: StepStats) -> None:
        """Update state from global statistics once per step (no-op for stateless margins)."""

    @property
    def linear_scale(self) -> float | None:
        """``s`` when every non-target logit is exactly ``s * cos`` with a constant ``s``, else None.

        The classifier then takes its fast path (an analytic backward, no autograd graph per chunk). Any
        subclass that changes non-target logits, the scale, normalisation, bias or sub-centres opts out.
        """
        cls = type(self)
        plain = (
            cls.negative_logits is Margin.negative_logits
            and cls.negative_from_cos is Margin.negative_from_cos
            and cls.multiplier is Margin.multiplier
        )
        if (not plain or self.interclass_threshold is not None or not self.normalize_features
                or not self.normalize_weights or self.uses_bias or self.num_subcenters != 1):
            return None
        return self.scale

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
    "softmax": dict(scale=1.0, angular_margin=0.0),
    "l2softmax": dict(scale=16.0, angular_margin=0.0),
    "normface": dict(scale=64.0, angular_margin=0.0),
    "lsoftmax": dict(scale=1.0, multiplicative_margin=4.0, angular_margin=0.0),
    "cosface": dict(scale=64.0, angular_margin=0.0, additive_margin=0.4),
    "amsoftmax": dict(scale=30.0, angular_margin=0.0, additive_margin=0.35),
    "arcface": dict(scale=64.0, angular_margin=0.5),
    "sphereface": dict(scale=64.0, multiplicative_margin=4.0, angular_margin=0.0),
    "combined": dict(scale=64.0, multiplicative_margin=1.0, angular_margin=0.3, additive_margin=0.2),
    "airface": dict(scale=64.0, angular_margin=0.45),
    "li_arcface": dict(scale=64.0, angular_margin=0.45),
    "subcenter_arcface": dict(scale=64.0, angular_margin=0.5),
    "adacos": dict(scale=64.0, angular_margin=0.0),
    "heated_up": dict(scale=16.0, angular_margin=0.0),
    "curricularface": dict(scale=64.0, angular_margin=0.5),
    "adaface": dict(scale=64.0, angular_margin=0.4),
    "magface": dict(scale=64.0, angular_margin=0.0),
    "elasticface": dict(scale=64.0, angular_margin=0.5),
    "elasticface_arc": dict(scale=64.0, angular_margin=0.5),
    "elasticface_arc_plus": dict(scale=64.0, angular_margin=0.5),
    "elasticface_cos": dict(scale=64.0, angular_margin=0.0, additive_margin=0.35),
    "elasticface_cos_plus": dict(scale=64.0, angular_margin=0.0, additive_margin=0.35),
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


def _sin_from_cos(cos: Tensor) -> Tensor:
    # sin(theta) >= 0 on [0, pi]; the clamp keeps d sin / d cos = -cos / sin finite at cos = +-1.
    return torch.sqrt(torch.clamp(1.0 - cos * cos, min=1e-12))


def _angle(cos: Tensor, eps: float = _ACOS_EPS) -> Tensor:
    """``theta = acos(cos)`` with the cosine clamped ``eps`` inside ``[-1, 1]`` (finite derivative)."""
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


def additive_angular(
    cos: Tensor, margin: float | Tensor, fallback: str = "continuous", easy_margin: bool = False
) -> Tensor:
    """``cos(theta + m)`` with a monotonic continuation where ``theta + m > pi`` (unscaled).

    Args:
        cos: cosines ``cos theta``.
        margin: ``m`` in radians, a float or a tensor broadcastable to ``cos`` (per-sample margins; may carry
            gradient, as MagFace's does).
        fallback: ``"continuous"``: ``cos theta - cos(pi - m) - 1`` beyond the threshold (meets ``-1`` at
            ``theta = pi - m``, keeps decreasing); ``"insightface"``: ``cos theta - m sin m`` (a small jump;
            insightface's MXNet code, arcface_torch in 2022 and pytorch-metric-learning, see :class:`ArcFace`).
        easy_margin: apply the margin only where ``cos theta > 0``.
    """
    if isinstance(margin, Tensor):
        cos_m, sin_m = torch.cos(margin), torch.sin(margin)
    else:
        cos_m, sin_m = math.cos(margin), math.sin(margin)
    cos_theta_m = cos * cos_m - _sin_from_cos(cos) * sin_m
    if easy_margin:
        return torch.where(cos > 0, cos_theta_m, cos)
    threshold = -cos_m  # cos(pi - m): cos theta below this means theta + m > pi
    if fallback == "continuous":
        shift = threshold + 1.0
    elif fallback == "insightface":
        shift = margin * sin_m
    else:
        raise ValueError(f"arc margin fallback must be 'continuous' or 'insightface', got {fallback!r}")
    return torch.where(cos > threshold, cos_theta_m, cos - shift)


@register_margin("softmax")
class Softmax(Margin):
    """Plain softmax: ``W_j . x + b_j``, nothing normalised, a per-class bias (the baseline).

    ``scale`` is unused. Option ``bias`` (default True): the classifier appends a constant-1 feature, so each
    class row carries its bias in an extra column (weight decay then applies to the bias too).
    """

    name = "softmax"
    OPTIONS = frozenset({"bias"})
    normalize_features = False
    normalize_weights = False

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        self.uses_bias = bool(spec.options.get("bias", True))


@register_margin("l2softmax")
class L2Softmax(Margin):
    """L2-Softmax / Crystal loss: features L2-normalised and scaled by ``alpha = scale``; weights are not.

    Ranjan et al. bound ``alpha >= log(p (C - 2) / (1 - p))`` for a target probability ``p``
    (:func:`l2softmax_min_scale`). Option ``bias`` (default False) adds a per-class bias as for softmax.
    """

    name = "l2softmax"
    OPTIONS = frozenset({"bias"})
    normalize_weights = False

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        self.uses_bias = bool(spec.options.get("bias", False))


def l2softmax_min_scale(num_classes: int, probability: float = 0.9) -> float:
    """The L2-Softmax paper's lower bound on ``alpha`` for ``num_classes`` classes and target ``probability``."""
    if num_classes < 3 or not 0.0 < probability < 1.0:
        raise ValueError(f"need num_classes >= 3 and probability in (0, 1), got {num_classes}, {probability}")
    return math.log(probability * (num_classes - 2) / (1.0 - probability))


@register_margin("cosface", "amsoftmax")
class CosFace(Margin):
    """CosFace / AM-Softmax: ``s (cos theta - m)`` with ``m = additive_margin``."""

    name = "cosface"

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        return self.scale * (cos_target - self.spec.additive_margin)


@register_margin("arcface")
class ArcFace(Margin):
    """ArcFace: ``s cos(theta + m)``, ``m = angular_margin``.

    ``cos(theta + m) = cos theta cos m - sin theta sin m`` is differentiated exactly
    (``d/d cos theta = cos m + sin m cos theta / sin theta``). Where ``theta + m > pi`` the curve would turn
    back up (a harder sample would get a *larger* logit); there we continue monotonically:

    - ``fallback="continuous"`` (default): ``cos theta - cos(pi - m) - 1``, which meets ``-1`` at
      ``theta = pi - m`` and keeps decreasing with theta;
    - ``fallback="insightface"``: ``cos theta - m sin m`` (a small jump at the threshold): insightface's MXNet
      training code (``src/train_softmax.py``, ``loss_type=4``, until Nov 2020), arcface_torch's
      ``losses.py`` from Jan to Dec 2022 (commits 2e2e8c97 .. 657ae30e), and pytorch-metric-learning's
      ``ArcFaceLoss`` (``losses/arcface_loss.py``). arcface_torch's current ``losses.py`` (since 657ae30e,
      2022-12-15) has no fallback: it takes ``cos(theta + m)`` everywhere, which turns back up past
      ``theta + m > pi``. See docs/losses.md.

    ``options["easy_margin"]``: apply the margin only where ``cos theta > 0`` (the original easy margin).
    """

    name = "arcface"
    OPTIONS = frozenset({"easy_margin", "fallback"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        m = float(spec.angular_margin)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"{spec.name} angular_margin must be in [0, pi), got {m}")
        self.margin = m
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)  # cos theta below this means theta + m > pi
        self.easy_margin = bool(spec.options.get("easy_margin", False))
        self.fallback = spec.options.get("fallback", "continuous")
        if self.fallback not in ("continuous", "insightface"):
            raise ValueError(f"{spec.name} fallback must be 'continuous' or 'insightface', got {self.fallback!r}")

    def angular_target(self, cos_target: Tensor) -> Tensor:
        """``cos(theta + m)`` with the ``theta + m > pi`` fallback (unscaled)."""
        return additive_angular(cos_target, self.margin, self.fallback, self.easy_margin)

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        return self.scale * self.angular_target(cos_target)


@register_margin("subcenter_arcface")
class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace: ArcFace against the closest of ``K`` sub-centres per class.

    Option ``num_subcenters`` (default 3) tells the classifier to keep ``K`` adjacent rows per class on the
    same shard and to use the max cosine over them (for the target and every negative). After training,
    :func:`distrib_face.losses.subcenter.clean_subcenters` keeps the dominant sub-centre of each class and
    lists the samples far from it (label noise).
    """

    name = "subcenter_arcface"
    OPTIONS = frozenset({"num_subcenters"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        k = spec.options.get("num_subcenters", 3)
        if int(k) != k or k < 1:
            raise ValueError(f"subcenter_arcface num_subcenters must be a positive integer, got {k}")
        self.num_subcenters = int(k)


def chebyshev_cos_multiple(cos: Tensor, m: int) -> Tensor:
    """``cos(m theta)`` as the Chebyshev polynomial ``T_m(cos theta)`` (exact, smooth in ``cos``)."""
    t_prev, t_cur = torch.ones_like(cos), cos
    if m == 0:
        return t_prev
    for _ in range(m - 1):
        t_prev, t_cur = t_cur, 2.0 * cos * t_cur - t_prev
    return t_cur


def monotonic_psi(cos: Tensor, m: int) -> Tensor:
    """``psi(theta) = (-1)^k cos(m theta) - 2k``, ``k = floor(m theta / pi)``, as a function of ``cos theta``.

    Monotonically decreasing on ``[0, pi]`` from 1 to ``1 - 2m``; ``k`` is piecewise constant (no gradient).
    """
    with torch.no_grad():
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        k = torch.floor(m * theta / math.pi).clamp(max=m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * chebyshev_cos_multiple(cos, m) - 2.0 * k


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
    OPTIONS = frozenset({"lambda_base", "lambda_gamma", "lambda_power", "lambda_min", "normalize_features"})
    _LAMBDA_DEFAULTS: ClassVar[tuple[float, float, float, float]] = (1000.0, 0.12, 1.0, 5.0)

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        m = spec.multiplicative_margin
        if m != int(m) or m < 1:
            raise ValueError(f"{spec.name} multiplicative_margin must be a positive integer, got {m}")
        self.m = int(m)
        opts = spec.options
        base, gamma, power, minimum = self._LAMBDA_DEFAULTS
        self.lambda_base = float(opts.get("lambda_base", base))
        self.lambda_gamma = float(opts.get("lambda_gamma", gamma))
        self.lambda_power = float(opts.get("lambda_power", power))
        self.lambda_min = float(opts.get("lambda_min", minimum))
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
        return monotonic_psi(cos, self.m)

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        lam = self.lambda_
        blended = (lam * cos_target + self.psi(cos_target)) / (1.0 + lam)
        return self.multiplier(mctx) * blended

    def begin_step(self, stats: StepStats) -> None:
        if stats.training:
            self.iteration += 1


@register_margin("lsoftmax")
class LSoftmax(SphereFace):
    """L-Softmax: ``||W_y|| ||x|| psi(theta_y)`` for the target, ``||W_j|| ||x|| cos theta_j`` otherwise.

    The multiplicative margin of SphereFace without weight normalisation (SphereFace came after and added
    it). The target uses ``mctx.weight_norms`` (``||W_y||``, with gradient): the classifier hands over
    ``x_unit . W_y``, from which ``cos theta_y`` is recovered. Annealed against softmax like SphereFace,
    with the L-Softmax release's constants (``lambda_base`` 1000, ``lambda_gamma`` 2.5e-5, ``lambda_power`` 35,
    ``lambda_min`` 0).
    """

    name = "lsoftmax"
    normalize_weights = False
    _LAMBDA_DEFAULTS = (1000.0, 2.5e-5, 35.0, 0.0)

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        if mctx.weight_norms is None:
            raise ValueError("lsoftmax needs mctx.weight_norms (the target class weight norms)")
        w_norm = mctx.weight_norms.clamp_min(1e-12)
        lam = self.lambda_
        # cos_target = ||W_y|| cos theta_y: keep the lambda term in that form, recover cos for psi.
        blended = (lam * cos_target + w_norm * self.psi(cos_target / w_norm)) / (1.0 + lam)
        return self.multiplier(mctx) * blended


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

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        theta = torch.acos(cos_target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
        inside = torch.cos(self.m1 * theta + self.m2) - self.m3
        beyond = cos_target - self.cos_threshold - 1.0 - self.m3
        return self.scale * torch.where(cos_target > self.cos_threshold, inside, beyond)


@register_margin("airface", "li_arcface")
class AirFace(Margin):
    """AirFace / Li-ArcFace: logits linear in the angle, ``s (pi - 2 (theta + m)) / pi`` for the target and
    ``s (pi - 2 theta) / pi`` for the others (``m = angular_margin``, default 0.45).

    Monotonic on the whole of ``[0, pi]``, so no fallback is needed.
    """

    name = "airface"

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        theta = _angle(cos_target)
        return self.scale * (math.pi - 2.0 * (theta + self.spec.angular_margin)) / math.pi

    def negative_from_cos(self, cos: Tensor, mctx: MarginContext) -> Tensor:
        return self.scale * (math.pi - 2.0 * _angle(cos)) / math.pi


@register_margin("adacos")
class AdaCos(Margin):
    """AdaCos: NormFace with an automatically chosen scale and no margin.

    Fixed (``options["dynamic"]=False``): ``s = sqrt(2) log(C - 1)``. Dynamic (default): that is the initial
    value, then every training step, before the logits,
    ``s <- log(B_avg) / cos(min(pi / 4, theta_med))`` with
    ``B_avg = (1 / N) sum_i sum_{j != y_i} exp(s_old cos theta_ij)`` over the global batch and every class
    (all-reduced by the classifier: ``StepStats.negative_logsumexp``) and ``theta_med`` the median target
    angle of the global batch (``torch.median``: the lower middle value, as the reference code). The scale is
    a buffer, so it is checkpointed.
    """

    name = "adacos"
    OPTIONS = frozenset({"dynamic"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        self.dynamic = bool(spec.options.get("dynamic", True))
        self.needs_negative_stats = self.dynamic
        self.register_buffer("adaptive_scale", torch.tensor(float("nan"), dtype=torch.float64))

    @staticmethod
    def fixed_scale(num_classes: int) -> float:
        """``sqrt(2) log(C - 1)``."""
        if num_classes < 3:
            raise ValueError(f"adacos needs at least 3 classes for a positive scale, got num_classes={num_classes}")
        return math.sqrt(2.0) * math.log(num_classes - 1)

    def set_num_classes(self, num_classes: int) -> None:
        super().set_num_classes(num_classes)
        self.adaptive_scale.fill_(self.fixed_scale(num_classes))

    def multiplier(self, mctx: MarginContext) -> Tensor:  # type: ignore[override]
        if self.num_classes is None:
            raise RuntimeError("adacos: set_num_classes(C) must be called before use (the classifier does)")
        return self.adaptive_scale

    def begin_step(self, stats: StepStats) -> None:
        if not (stats.training and self.dynamic) or stats.target_cos.numel() == 0:
            return
        if stats.negative_logsumexp is None:
            raise RuntimeError("adacos (dynamic) needs StepStats.negative_logsumexp; the classifier computes it")
        theta_med = torch.median(torch.acos(stats.target_cos.detach().clamp(-1.0, 1.0))).to(torch.float64)
        log_b_avg = stats.negative_logsumexp.detach().to(torch.float64) - math.log(stats.target_cos.numel())
        self.adaptive_scale.copy_(log_b_avg / torch.cos(torch.clamp(theta_med, max=math.pi / 4)))


@register_margin("heated_up")
class HeatedUp(Margin):
    """Heated-up softmax: NormFace whose scale (inverse temperature) drops late in training.

    Options: ``scale_end`` (default 4; the start is ``scale``), ``total_steps`` (default 10000),
    ``heat_start`` (fraction of ``total_steps`` where heating starts, default 0.75) and ``schedule``
    (``"step"``: jump to ``scale_end``; ``"linear"`` (default) or ``"cosine"``: move to it by
    ``total_steps``). ``t`` counts training steps begun (a checkpointed buffer).
    """

    name = "heated_up"
    OPTIONS = frozenset({"scale_end", "total_steps", "heat_start", "schedule"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        opts = spec.options
        self.scale_end = float(opts.get("scale_end", 4.0))
        self.total_steps = int(opts.get("total_steps", 10000))
        self.heat_start = float(opts.get("heat_start", 0.75))
        self.schedule = opts.get("schedule", "linear")
        if self.schedule not in ("step", "linear", "cosine"):
            raise ValueError(f"heated_up schedule must be 'step', 'linear' or 'cosine', got {self.schedule!r}")
        if self.total_steps < 1 or not 0.0 <= self.heat_start < 1.0 or not self.scale_end > 0:
            raise ValueError(
                f"heated_up needs total_steps >= 1, heat_start in [0, 1), scale_end > 0; got "
                f"{self.total_steps}, {self.heat_start}, {self.scale_end}"
            )
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def scale_at(self, step: int) -> float:
        """The scale after ``step`` training steps have begun."""
        frac = step / self.total_steps
        if frac < self.heat_start:
            return self.scale
        progress = min(1.0, (frac - self.heat_start) / (1.0 - self.heat_start))
        if self.schedule == "step":
            return self.scale_end
        if self.schedule == "linear":
            return self.scale + (self.scale_end - self.scale) * progress
        return self.scale_end + (self.scale - self.scale_end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def multiplier(self, mctx: MarginContext) -> float:  # type: ignore[override]
        return self.scale_at(int(self.step))

    def begin_step(self, stats: StepStats) -> None:
        if stats.training:
            self.step += 1


@register_margin("curricularface")
class CurricularFace(ArcFace):
    """CurricularFace: ArcFace's target, and hard negatives re-weighted by the training progress ``t``.

    A negative is hard when ``cos theta_j > cos(theta_y + m)`` (with ``cos theta_y`` from ``mctx.target_cos``);
    its logit becomes ``s cos theta_j (t + cos theta_j)`` (easy ones stay ``s cos theta_j``). ``t`` is an EMA
    of the mean target cosine over the global batch, updated before the logits of every training step:
    ``t <- momentum * mean(cos theta_y) + (1 - momentum) t`` (option ``momentum``, default 0.01; ``t_0 = 0``).
    """

    name = "curricularface"
    OPTIONS = frozenset({"momentum"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        self.momentum = float(spec.options.get("momentum", 0.01))
        self.register_buffer("t", torch.zeros((), dtype=torch.float64))

    def begin_step(self, stats: StepStats) -> None:
        if stats.training and stats.target_cos.numel():
            mean = stats.target_cos.detach().to(torch.float64).mean()
            self.t.copy_(self.momentum * mean + (1.0 - self.momentum) * self.t)

    def negative_from_cos(self, cos: Tensor, mctx: MarginContext) -> Tensor:
        if mctx.target_cos is None:
            raise ValueError("curricularface needs mctx.target_cos for its negatives")
        tc = mctx.target_cos.detach().to(cos.dtype)
        cos_theta_m = tc * self.cos_m - _sin_from_cos(tc) * self.sin_m  # [N]
        hard = cos.detach() > cos_theta_m[:, None]
        return self.scale * torch.where(hard, cos * (self.t.to(cos.dtype) + cos), cos)


@register_margin("adaface")
class AdaFace(Margin):
    """AdaFace: a margin that adapts to image quality, proxied by the feature norm.

    With ``z = clip(h (||x|| - mu) / (sigma + eps), -1, 1)`` (``||x||`` clipped to [0.001, 100], detached;
    ``mu``, ``sigma`` EMAs of the mean and unbiased std of the norms over the *global* batch, momentum
    ``t_alpha`` 0.01, starting at 20 and 100): target logit
    ``s (cos(clip(theta - m z, eps, pi - eps)) - (m + m z))``; negatives ``s cos theta``; every cosine is
    first clipped to ``[-1 + eps, 1 - eps]`` (``eps`` 1e-3). ``m = angular_margin`` (0.4), option ``h`` (0.333).
    """

    name = "adaface"
    OPTIONS = frozenset({"h", "t_alpha", "eps"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        self.h = float(spec.options.get("h", 0.333))
        self.t_alpha = float(spec.options.get("t_alpha", 0.01))
        self.eps = float(spec.options.get("eps", 1e-3))
        self.register_buffer("batch_mean", torch.tensor(20.0, dtype=torch.float64))
        self.register_buffer("batch_std", torch.tensor(100.0, dtype=torch.float64))

    def begin_step(self, stats: StepStats) -> None:
        if not stats.training or stats.feature_norms is None or stats.feature_norms.numel() < 2:
            return
        safe = stats.feature_norms.detach().to(torch.float64).clamp(0.001, 100.0)
        self.batch_mean.copy_(safe.mean() * self.t_alpha + (1.0 - self.t_alpha) * self.batch_mean)
        self.batch_std.copy_(safe.std() * self.t_alpha + (1.0 - self.t_alpha) * self.batch_std)

    def margin_scaler(self, feature_norms: Tensor) -> Tensor:
        """``z`` in [-1, 1] per row from ``[N, 1]`` or ``[N]`` norms (no gradient)."""
        safe = feature_norms.detach().reshape(-1).clamp(0.001, 100.0)
        z = (safe - self.batch_mean.to(safe.dtype)) / (self.batch_std.to(safe.dtype) + self.eps)
        return (z * self.h).clamp(-1.0, 1.0)

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        m = self.spec.angular_margin
        cos = cos_target.clamp(-1.0 + self.eps, 1.0 - self.eps)
        z = self.margin_scaler(mctx.feature_norms).to(cos.dtype)
        theta_m = (torch.acos(cos) - m * z).clamp(self.eps, math.pi - self.eps)
        return self.scale * (torch.cos(theta_m) - (m + m * z))

    def negative_from_cos(self, cos: Tensor, mctx: MarginContext) -> Tensor:
        return self.scale * cos.clamp(-1.0 + self.eps, 1.0 - self.eps)


@register_margin("magface")
class MagFace(Margin):
    """MagFace: an ArcFace margin that grows with the feature magnitude ``a = clip(||x||, l_a, u_a)``.

    ``m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a)`` (options ``lower_norm`` 10, ``upper_norm`` 110,
    ``lower_margin`` 0.45, ``upper_margin`` 0.8); target ``s cos(theta + m(a))`` with ArcFace's fallback
    (``fallback``, ``easy_margin`` as ArcFace), differentiable in ``a``. The paper's norm regulariser
    ``lambda_g g(a)``, ``g(a) = a / u_a^2 + 1 / a``, is a separate loss term on the embeddings:
    :func:`distrib_face.losses.metric.magface_regularizer` (auxiliary loss ``magface``, weight 35).
    """

    name = "magface"
    OPTIONS = frozenset({"lower_norm", "upper_norm", "lower_margin", "upper_margin", "fallback", "easy_margin"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        opts = spec.options
        self.lower_norm, self.upper_norm = float(opts.get("lower_norm", 10.0)), float(opts.get("upper_norm", 110.0))
        self.lower_margin = float(opts.get("lower_margin", 0.45))
        self.upper_margin = float(opts.get("upper_margin", 0.8))
        self.fallback = opts.get("fallback", "continuous")
        self.easy_margin = bool(opts.get("easy_margin", False))
        if not 0 < self.lower_norm < self.upper_norm:
            raise ValueError(f"magface needs 0 < lower_norm < upper_norm, got {self.lower_norm}, {self.upper_norm}")

    def margin_of(self, feature_norms: Tensor) -> Tensor:
        """``m(a)`` per row from ``[N, 1]`` or ``[N]`` norms (with gradient inside the clip range)."""
        a = feature_norms.reshape(-1).clamp(self.lower_norm, self.upper_norm)
        slope = (self.upper_margin - self.lower_margin) / (self.upper_norm - self.lower_norm)
        return slope * (a - self.lower_norm) + self.lower_margin

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        m = self.margin_of(mctx.feature_norms).to(cos_target.dtype)
        return self.scale * additive_angular(cos_target, m, self.fallback, self.easy_margin)


def _mix_seed(*values: int) -> int:
    out = 0x9E3779B97F4A7C15
    for v in values:
        out = ((out ^ (int(v) & ((1 << 64) - 1))) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    return out & ((1 << 63) - 1)


@register_margin("elasticface", "elasticface_arc", "elasticface_arc_plus", "elasticface_cos", "elasticface_cos_plus")
class ElasticFace(Margin):
    """ElasticFace: the margin of each sample drawn from ``N(m, sigma)`` every training step.

    ``elasticface`` / ``elasticface_arc``: ``s cos(theta + m_i)`` (ArcFace's fallback added beyond pi);
    ``elasticface_cos``: ``s (cos theta - m_i)``. The ``_plus`` names (or ``options["plus"]``) sort the draws so
    that the sample with the lowest target cosine (hardest) gets the largest margin. ``m`` is
    ``angular_margin`` (arc) or ``additive_margin`` (cos); option ``sigma`` (default 0.05).

    Reproducible and rank-independent: the draws of a step come from a generator seeded by
    ``(options["seed"], step)``; sample ``i`` of the global batch takes draw ``i`` (the plus variants sort over
    the whole global batch, whose target cosines every rank holds). ``step`` is a checkpointed buffer. Outside
    training the margin is the mean ``m``.
    """

    name = "elasticface"
    OPTIONS = frozenset({"sigma", "plus", "seed", "fallback"})

    def __init__(self, spec: MarginSpec) -> None:
        super().__init__(spec)
        self.kind = "cos" if "_cos" in spec.name else "arc"
        self.plus = spec.name.endswith("_plus") or bool(spec.options.get("plus", False))
        self.mean_margin = float(spec.additive_margin if self.kind == "cos" else spec.angular_margin)
        self.sigma = float(spec.options.get("sigma", 0.05))
        self.seed = int(spec.options.get("seed", 0))
        self.fallback = spec.options.get("fallback", "continuous")
        if self.sigma < 0:
            raise ValueError(f"{spec.name} sigma must be >= 0, got {self.sigma}")
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._row_margins: Tensor | None = None

    def draw_margins(self, target_cos: Tensor, step: int) -> Tensor:
        """The ``[B_global]`` margins of training step ``step`` (float64, on ``target_cos``'s device)."""
        gen = torch.Generator(device="cpu").manual_seed(_mix_seed(self.seed, step))
        draws = torch.randn(target_cos.numel(), generator=gen, dtype=torch.float64) * self.sigma + self.mean_margin
        if self.plus:
            order = torch.argsort(target_cos.detach().cpu(), descending=True, stable=True)  # easiest first
            margins = torch.empty_like(draws)
            margins[order] = torch.sort(draws).values  # ... gets the smallest margin
            draws = margins
        return draws.to(target_cos.device)

    def begin_step(self, stats: StepStats) -> None:
        if not stats.training:
            self._row_margins = None
            return
        self.step += 1
        self._row_margins = self.draw_margins(stats.target_cos, int(self.step))

    def row_margins(self, num_rows: int, mctx: MarginContext, dtype: torch.dtype) -> Tensor | float:
        """This step's margins of the rows in ``mctx`` (the mean margin outside training)."""
        if self._row_margins is None:
            return self.mean_margin
        index = mctx.row_index if mctx.row_index is not None else torch.arange(num_rows, device=self._row_margins.device)
        return self._row_margins[index].to(dtype)

    def target_logit(self, cos_target: Tensor, mctx: MarginContext) -> Tensor:
        m = self.row_margins(cos_target.shape[0], mctx, cos_target.dtype)
        if self.kind == "cos":
            return self.scale * (cos_target - m)
        return self.scale * additive_angular(cos_target, m, self.fallback)
