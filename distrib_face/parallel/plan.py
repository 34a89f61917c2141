"""How much memory a class shard needs, component by component, and the largest class count that fits.

``distrib-face bench classifier --plan`` prints it. The model follows what
:class:`~distrib_face.parallel.classifier.ShardedMarginClassifier` and
:class:`~distrib_face.parallel.optim.ShardOptimizer` allocate (checked against the measured peak on CPU by
tests/unit/test_classifier_plan.py):

per class of the shard (``C_local = ceil(C / W)``, ``K`` rows of ``D`` values per class)
    weights ``K D w`` and the optimizer state (SGD momentum ``K D w``, AdamW moments ``2 K D w``), ``w`` the
    storage bytes (4 fp32, 2 bf16); the per-class step count (8 bytes); the sampler's marker (4 bytes,
    sampling only). With ``offload: host`` these live in host memory.
per class *in use* each step (``S`` of them: ``num_slots``, about ``rate x C_local``; all of them without sampling)
    dense in-device: the weight gradient ``K D w``. Sampled or offloaded: the row buffer ``K D w``, its
    gradient ``K D w``, the optimizer-state rows ``K D w`` each, and the sampling temporaries (about 1.07
    draws per slot at rate 0.1, six int64 vectors of that length). Offloaded rows are also staged in host
    memory (one buffer for the weights and one per state tensor, pinned on CUDA, used both ways).
per step, whatever the class count
    the logit block ``B_global x chunk`` fp32 and the chunk's weight copies (``chunk x D`` fp32, up to three
    for bf16 storage), or, during the bf16 update, its float32 chunk temporaries; whichever is larger.

The backbone, its activations and the CUDA context are not modelled: ``reserve`` holds them back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from distrib_face.parallel.optim import UPDATE_CHUNK_ELEMENTS
from distrib_face.parallel.sampling import num_draws, num_sampled_classes, num_slots

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
WEIGHT_BYTES = {"fp32": 4, "bf16": 2}
STATE_TENSORS = {"sgd": 1, "sgd_no_momentum": 0, "adamw": 2}
#: int64 vectors of the draw count alive at once while sampling (draws, ids, classes, first ids, ranks, slots).
SAMPLING_VECTORS = 6


def parse_bytes(text: str) -> int:
    """``"80GB"`` -> 80e9, ``"80GiB"`` -> 80 x 2**30, ``"512MB"``, or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 80GB, 80GiB, 512MB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(kw_only=True)
class PlanSpec:
    """One classifier configuration per rank."""

    classes: int
    embedding: int = 512
    batch: int = 256
    world_size: int = 1
    sample_rate: float = 1.0
    weight_dtype: str = "fp32"
    offload: str = "none"
    optimizer: str = "sgd"
    subcenters: int = 1
    chunk_size: int = 65536

    def __post_init__(self) -> None:
        if self.weight_dtype not in WEIGHT_BYTES:
            raise ValueError(f"--weight-dtype must be one of {sorted(WEIGHT_BYTES)}, got {self.weight_dtype!r}")
        if self.offload not in ("none", "host"):
            raise ValueError(f"--offload must be none or host, got {self.offload!r}")
        if self.optimizer not in STATE_TENSORS:
            raise ValueError(f"optimizer must be one of {sorted(STATE_TENSORS)}, got {self.optimizer!r}")
        if self.classes < self.world_size:
            raise ValueError(f"--classes ({self.classes}) must be >= --world-size ({self.world_size})")


@dataclass
class Component:
    """One line of the plan: bytes on the device and in host memory, and whether it scales with classes."""

    name: str
    device_bytes: float
    host_bytes: float = 0.0
    per_class: bool = True


@dataclass
class Plan:
    """The memory of one rank for ``spec`` and the largest class count that fits ``device_memory``."""

    spec: PlanSpec
    local_classes: int
    rows_in_use: int
    components: list[Component] = field(default_factory=list)
    device_memory: int = 0
    reserve: int = 0
    max_classes: int = 0

    @property
    def device_total(self) -> float:
        return sum(c.device_bytes for c in self.components)

    @property
    def host_total(self) -> float:
        return sum(c.host_bytes for c in self.components)


def _components(spec: PlanSpec, local_classes: int) -> tuple[list[Component], int]:
    k, d = spec.subcenters, spec.embedding
    w = WEIGHT_BYTES[spec.weight_dtype]
    state_tensors = STATE_TENSORS[spec.optimizer]
    offload = spec.offload == "host"
    global_batch = spec.batch * spec.world_size
    sampled = spec.sample_rate < 1.0
    slots = num_slots(num_sampled_classes(spec.sample_rate, local_classes), global_batch, local_classes)
    sampled = sampled and slots < local_classes
    in_use = slots if sampled else local_classes
    row = k * d * w  # one class's rows in storage dtype

    def where(nbytes: float, on_host: bool) -> tuple[float, float]:
        return (0.0, nbytes) if on_host else (nbytes, 0.0)

    out = [
        Component("weights", *where(local_classes * row, offload)),
        Component("optimizer state (momentum / moments)", *where(local_classes * row * state_tensors, offload)),
        Component("per-class step counts", *where(local_classes * 8, offload)),
    ]
    if sampled:
        draws = num_draws(local_classes, slots)
        out.append(Component("sampling marker", *where((local_classes + 1) * 4, offload)))
        out.append(Component("sampling temporaries", *where(draws * 8 * SAMPLING_VECTORS, offload)))
    if sampled or offload:
        out.append(Component("row buffer (rows in use)", in_use * row))
        out.append(Component("gradient of the rows in use", in_use * row))
        out.append(Component("optimizer-state rows in use", in_use * row * state_tensors))
        if offload:  # one staging buffer for the weights and one per state tensor, both directions
            out.append(Component("host staging of the rows in use", 0.0, in_use * row * (1 + state_tensors)))
    else:
        out.append(Component("weight gradient", in_use * row))
    chunk = min(spec.chunk_size, in_use)
    blocks = 2 if global_batch <= k * d else 1  # a second [B, chunk] block holds the raw cosines when B <= D
    logits = blocks * global_batch * chunk * 4 + chunk * k * d * (4 * 3 if w < 4 else 4)
    # bf16: float32 copies of a chunk of rows (weights, gradient, state) and the rounding noise (int32).
    update = min(UPDATE_CHUNK_ELEMENTS, in_use * k * d) * 4 * (3 + state_tensors) if w < 4 else 0
    out.append(Component("per-step work (logit block / update chunks)", max(logits, update), per_class=False))
    return out, in_use


def make_plan(spec: PlanSpec, device_memory: int = 0, reserve: int = 0) -> Plan:
    """The plan of ``spec``; with ``device_memory``, also the largest class count that fits (same world)."""
    local = math.ceil(spec.classes / spec.world_size)
    components, in_use = _components(spec, local)
    plan = Plan(spec, local, in_use, components, device_memory, reserve)
    if device_memory:
        budget = device_memory - reserve

        def fits(classes: int) -> bool:
            trial = PlanSpec(**{**spec.__dict__, "classes": classes})
            return sum(c.device_bytes for c in _components(trial, math.ceil(classes / spec.world_size))[0]) <= budget

        lo, hi = 0, spec.world_size
        while fits(hi) and hi < 2**40:
            lo, hi = hi, hi * 2
        while hi - lo > max(1, spec.world_size):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        plan.max_classes = lo
    return plan


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.2f}"


def format_plan(plan: Plan) -> str:
    """A Markdown table: bytes per class and GB per rank of each component, the totals, the largest C."""
    spec = plan.spec
    head = (f"Plan per rank: {spec.classes:,} classes over {spec.world_size} rank(s) ({plan.local_classes:,} per "
            f"rank), {spec.embedding}-d, batch {spec.batch}/rank, rate {spec.sample_rate:g} "
            f"({plan.rows_in_use:,} classes in use per step), weights {spec.weight_dtype}, {spec.optimizer}, "
            f"offload {spec.offload}")
    lines = [head, "", "| component | bytes per class | device GB | host GB |", "|---|---|---|---|"]
    for c in plan.components:
        per = f"{(c.device_bytes + c.host_bytes) / plan.local_classes:,.1f}" if c.per_class else "- (fixed)"
        lines.append(f"| {c.name} | {per} | {_gb(c.device_bytes)} | {_gb(c.host_bytes)} |")
    per_class_device = sum(c.device_bytes for c in plan.components if c.per_class) / plan.local_classes
    lines.append(f"| **total** | {per_class_device:,.1f} on the device | **{_gb(plan.device_total)}** | "
                 f"{_gb(plan.host_total)} |")
    if plan.device_memory:
        fits = "fits" if plan.device_total <= plan.device_memory - plan.reserve else "does NOT fit"
        lines += ["", f"Device memory {_gb(plan.device_memory)} GB, {_gb(plan.reserve)} GB reserved for the "
                      f"backbone: {spec.classes:,} classes {fits}; the largest class count that fits is "
                      f"**{plan.max_classes:,}** ({plan.max_classes / 1e6:,.1f}M)."]
    return "\n".join(lines)


def format_plan_summary(plans: list[Plan], measured: list[dict[str, float]] | None = None) -> str:
    """One row per plan: device and host GB per rank, whether it fits, the largest C; with ``measured``
    (from :func:`~distrib_face.parallel.bench.measure_peak`), the peak measured on this machine beside it."""
    measured = measured or []
    head = "| classes | rate | weights | offload | in use/step | device GB/rank | host GB/rank | fits | largest C |"
    if measured:
        head += " measured peak GB (CPU) | measured / plan |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, p in enumerate(plans):
        fits = "yes" if p.device_memory and p.device_total <= p.device_memory - p.reserve else "no"
        line = (f"| {p.spec.classes:,} | {p.spec.sample_rate:g} | {p.spec.weight_dtype} | {p.spec.offload} | "
                f"{p.rows_in_use:,} | {_gb(p.device_total)} | {_gb(p.host_total)} | {fits} | {p.max_classes:,} |")
        if i < len(measured):
            m = measured[i]
            line += f" {_gb(m['measured_bytes'])} | {m['measured_bytes'] / m['plan_bytes']:.2f} |"
        lines.append(line)
    return "\n".join(lines)
