"""``distrib-face bench classifier``: ms per step and peak memory, sharded classifier vs a naive baseline.

A step is forward + backward + optimizer update (SGD with momentum and weight decay). Each rank gets
``batch`` random embeddings (never zeros) with uniformly random labels. The naive baseline is what a
single-GPU trainer does: one ``nn.Linear`` holding every class, the same margin on the whole
``[B_global, C]`` logit matrix, ``F.cross_entropy`` and ``torch.optim.SGD``, in one process on the global
batch. Times are medians of timed steps after warm-up (CUDA synchronised); memory is the CUDA
allocator's peak, or on CPU the growth of the process's peak resident set over its size before setup.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distrib_face.dtypes import parse_dtype

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = ("fp32", "bf16", "fp16")


def _compute_dtype(name: str) -> torch.dtype | None:
    """The classifier's ``compute_dtype`` for a ``--dtype`` name (fp32: the weights' own, None)."""
    return None if name == "fp32" else parse_dtype(name, "--dtype")


@dataclass(kw_only=True)
class BenchSpec:
    """What to measure (``batch`` is per rank; the baseline runs the global batch in one process)."""

    classes: int
    batch: int = 256
    embedding: int = 512
    sample_rate: float = 1.0
    dtype: str = "fp32"
    world_size: int = 1
    steps: int = 5
    warmup: int = 2
    chunk_size: int = 65536
    margin: str = "arcface"
    device: str = "cpu"
    kernel: str = "auto"
    """The classifier's ``kernel`` (auto / torch / triton)."""
    floor: bool = False
    profile: int = 0
    weight_dtype: str = "fp32"
    """Storage dtype of the class weights and their optimizer state (fp32 / bf16; fp16 rows are skipped)."""
    offload: str = "none"
    optimizer: str = "sgd"
    threads: int = 0
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--dtype must be one of {list(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.weight_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--weight-dtype must be one of {list(COMPUTE_DTYPES)}, got {self.weight_dtype!r}")
        from distrib_face.parallel.kernels import check_kernel

        check_kernel(self.kernel)
        if self.classes < self.world_size:
            raise ValueError(f"--classes ({self.classes}) must be >= --world-size ({self.world_size})")
        if self.device.startswith("cuda") and self.world_size > 1:
            raise ValueError("several ranks on one GPU are refused by NCCL: use --world-size 1 on a GPU")
        if self.offload not in ("none", "host"):
            raise ValueError(f"--offload must be none or host, got {self.offload!r}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"--clock must be wall or cpu, got {self.clock!r}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: the cores shared out over the ranks), got {self.threads}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")


@dataclass
class BenchResult:
    """One measured configuration (per rank, the slowest / largest rank reported)."""

    impl: str
    world_size: int
    classes: int
    batch_per_rank: int
    sample_rate: float
    dtype: str
    device: str
    ms_per_step: float
    peak_mem_mb: float
    note: str = ""
    rows_per_step: int = 0
    floor_ms: float = float("nan")
    profile: str = ""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step_fn: Any, spec: BenchSpec, device: torch.device) -> list[float]:
    # "cpu": the process's CPU time (all its threads), which other processes on a shared machine do not
    # inflate; with --threads 1 it is the single-core cost. "wall": elapsed time (what a user waits).
    clock = time.process_time if spec.clock == "cpu" and device.type == "cpu" else time.perf_counter
    for _ in range(spec.warmup):
        step_fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec.steps):
        _sync(device)
        t0 = clock()
        step_fn()
        _sync(device)
        times.append((clock() - t0) * 1000.0)
    return times


def _memory_mb(device: torch.device, rss_before: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mb() - rss_before


def _floor_fn(spec: BenchSpec, rows: int, device: torch.device) -> Any:
    """The four matmuls of one fast-path step over ``rows`` class rows, chunked as the classifier.

    Outputs are preallocated (``out=``): the floor is the arithmetic, not the allocator.
    """
    gen = torch.Generator(device=device).manual_seed(99)
    compute = _compute_dtype(spec.dtype) or torch.float32
    batch = spec.batch * spec.world_size
    chunk = min(rows, spec.chunk_size)
    x = torch.randn(batch, spec.embedding, device=device, generator=gen).to(compute)  # [B_global, D]
    w = torch.randn(rows, spec.embedding, device=device, generator=gen).to(compute)  # [rows, D]
    g = torch.randn(batch, chunk, device=device, generator=gen).to(compute)  # [B, chunk]
    logits = torch.empty(batch, chunk, device=device, dtype=compute)
    grad_x = torch.empty(batch, spec.embedding, device=device, dtype=compute)
    grad_w = torch.empty(rows, spec.embedding, device=device, dtype=compute)

    def four() -> None:
        for c0 in range(0, rows, chunk):
            c1 = min(c0 + chunk, rows)
            w_c, g_c, out = w[c0:c1], g[:, : c1 - c0], logits[:, : c1 - c0]
            torch.mm(x, w_c.t(), out=out)  # forward logits
            torch.mm(x, w_c.t(), out=out)  # recomputed in the backward
            torch.mm(g_c, w_c, out=grad_x)  # embedding gradient (accumulated by the step; same cost)
            torch.mm(g_c.t(), x, out=grad_w[c0:c1])  # weight gradient

    return four


def _matmul_floor_ms(spec: BenchSpec, rows: int, device: torch.device) -> float:
    """Median ms of :func:`_floor_fn`'s four matmuls."""
    return statistics.median(_timed(_floor_fn(spec, rows, device), spec, device))


def _profile_table(step_fn: Any, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step_fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


class UnsupportedSpec(RuntimeError):
    """A benchmark row this version of the classifier cannot run (reported as skipped, with the reason)."""


def weight_dtype_kwargs(weight_dtype: str) -> dict[str, Any]:
    """``ShardedMarginClassifier`` keyword arguments for a weight storage dtype (``{}`` for fp32).

    Raises:
        UnsupportedSpec: a storage dtype the classifier does not keep (only fp32 and bf16 are).
    """
    if weight_dtype == "fp32":
        return {}
    if weight_dtype != "bf16":
        raise UnsupportedSpec(f"weight_dtype={weight_dtype}: the classifier stores fp32 or bf16 weights")
    return {"dtype": parse_dtype(weight_dtype, "--weight-dtype")}


def _build_case(spec: BenchSpec, group: Any = None) -> tuple[Any, Any, Any]:
    """The classifier of ``spec`` with its optimizer and inputs: ``(step function, classifier, embeddings)``."""
    from distrib_face.losses import create_margin
    from distrib_face.parallel.classifier import ShardedMarginClassifier
    from distrib_face.parallel.optim import ShardOptimizer

    device = torch.device(spec.device)
    clf = ShardedMarginClassifier(
        spec.classes, spec.embedding, margin=create_margin(spec.margin), sample_rate=spec.sample_rate,
        group=group, device=device, chunk_size=spec.chunk_size, compute_dtype=_compute_dtype(spec.dtype),
        kernel=spec.kernel, offload=spec.offload, equal_batches=True, **weight_dtype_kwargs(spec.weight_dtype),
    )
    opt = ShardOptimizer(clf, spec.optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(1234 + clf.rank)
    emb = torch.randn(spec.batch, spec.embedding, device=device, generator=gen).requires_grad_(True)
    labels = torch.randint(0, spec.classes, (spec.batch,), device=device, generator=gen)

    def step() -> None:
        loss = clf(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    return step, clf, emb


def _kernel_used(spec: BenchSpec, clf: Any, emb: Any) -> str:
    from distrib_face.parallel.kernels import resolve_kernel

    if clf.margin.linear_scale is not None and clf.num_subcenters == 1 and not clf.bias_columns:
        return resolve_kernel(spec.kernel, emb, clf.weight, clf.compute_dtype)
    return "torch"


def _sharded_rank(spec: BenchSpec, group: Any = None) -> dict[str, Any]:
    device = torch.device(spec.device)
    rss_before = _current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, clf, emb = _build_case(spec, group)
    times = _timed(step, spec, device)
    out: dict[str, Any] = {"ms": statistics.median(times), "mem": _memory_mb(device, rss_before),
                           "rows": _rows_per_step(clf), "kernel": _kernel_used(spec, clf, emb)}
    if spec.floor:
        out["floor"] = _matmul_floor_ms(spec, out["rows"], device)
    if spec.profile:
        out["profile"] = _profile_table(step, spec.profile)
    return out


def _interleaved(specs: list[BenchSpec]) -> list[dict[str, Any]]:
    """Every case of ``specs`` built in this process and timed round-robin, one step of each in turn.

    On a shared machine the conditions (other processes' load, memory traffic, clock speed) drift within
    seconds; cases timed in alternation see the same drift, so their *ratios* hold even when the absolute
    times do not. Memory is not isolated per case (reported as NaN).
    """
    device = torch.device(specs[0].device)
    cases = [_build_case(spec) for spec in specs]
    floors = [_floor_fn(spec, _rows_per_step_after(step, clf), device) if spec.floor else None
              for spec, (step, clf, _) in zip(specs, cases)]
    clock = time.process_time if specs[0].clock == "cpu" else time.perf_counter
    for _ in range(specs[0].warmup):
        for (step, _, _), floor in zip(cases, floors):
            step()
            if floor is not None:
                floor()
    times: list[list[float]] = [[] for _ in cases]
    floor_times: list[list[float]] = [[] for _ in cases]
    for _ in range(specs[0].steps):
        for i, ((step, _, _), floor) in enumerate(zip(cases, floors)):
            t0 = clock()
            step()
            times[i].append((clock() - t0) * 1000.0)
            if floor is not None:
                t0 = clock()
                floor()
                floor_times[i].append((clock() - t0) * 1000.0)
    out = []
    for i, (spec, (step, clf, emb)) in enumerate(zip(specs, cases)):
        row: dict[str, Any] = {"ms": statistics.median(times[i]), "mem": float("nan"), "rows": _rows_per_step(clf),
                               "kernel": _kernel_used(spec, clf, emb)}
        if floor_times[i]:
            row["floor"] = statistics.median(floor_times[i])
        if spec.profile:
            row["profile"] = _profile_table(step, spec.profile)
        out.append(row)
    return out


def _rows_per_step_after(step: Any, clf: Any) -> int:
    step()  # one step, so that the classifier knows the rows it uses
    return _rows_per_step(clf)


def measure_peak(spec: BenchSpec) -> dict[str, float]:
    """Run ``spec`` (world 1, CPU) in a fresh process; its peak memory growth in bytes and the plan's total.

    The check behind ``--plan --measure`` and tests/unit/test_classifier_plan.py: on a CPU host and device are
    the same memory, so the measured peak resident growth is compared with the plan's device + host total.
    """
    from distrib_face.parallel.plan import PlanSpec, make_plan

    if spec.world_size != 1 or not spec.device.startswith("cpu"):
        raise ValueError("measure_peak runs one CPU process: --world-size 1 --device cpu")
    measured = _spawn(spec, "sharded", 1)[0]
    plan = make_plan(PlanSpec(classes=spec.classes, embedding=spec.embedding, batch=spec.batch, world_size=1,
                              sample_rate=spec.sample_rate, weight_dtype=spec.weight_dtype, offload=spec.offload,
                              optimizer=spec.optimizer, chunk_size=spec.chunk_size))
    return {"measured_bytes": measured["mem"] * 2**20, "plan_bytes": plan.device_total + plan.host_total,
            "ms_per_step": measured["ms"]}


def _rows_per_step(clf: Any) -> int:
    """Class rows a training step of ``clf`` computes logits for (all of the shard without sampling)."""
    _, rows = clf.active_rows()
    return int(rows.shape[0])


def _baseline(spec: BenchSpec) -> tuple[float, float]:
    from distrib_face.losses import MarginContext, create_margin

    device = torch.device(spec.device)
    rss_before = _current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    margin = create_margin(spec.margin)
    linear = torch.nn.Linear(spec.embedding, spec.classes, bias=False, device=device)
    torch.nn.init.normal_(linear.weight, std=0.01)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batch = spec.batch * spec.world_size
    gen = torch.Generator(device=device).manual_seed(1234)
    emb = torch.randn(batch, spec.embedding, device=device, generator=gen).requires_grad_(True)
    labels = torch.randint(0, spec.classes, (batch,), device=device, generator=gen)
    rows = torch.arange(batch, device=device)
    compute = _compute_dtype(spec.dtype)

    def step() -> None:
        with torch.autocast(device.type, dtype=compute, enabled=compute is not None):
            cos = F.linear(F.normalize(emb), F.normalize(linear.weight)).float()
        mctx = MarginContext(feature_norms=emb.norm(dim=1, keepdim=True))
        logits = margin.negative_logits(cos, mctx).index_put((rows, labels), margin.target_logit(cos[rows, labels], mctx))
        F.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    times = _timed(step, spec, device)
    return statistics.median(times), _memory_mb(device, rss_before)


def _worker(rank: int, spec: Any, store: str, out_dir: str, impl: str) -> None:
    first = spec[0] if isinstance(spec, list) else spec
    threads = first.threads or max(1, (os.cpu_count() or 1) // first.world_size)
    torch.set_num_threads(threads)
    group = None
    if impl == "sharded" and first.world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(spec.world_size))
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=spec.world_size)
    try:
        if impl == "interleaved":
            result = _interleaved(spec)  # a list of specs, all in this process
        elif impl == "sharded":
            result = _sharded_rank(spec, group)
        else:
            ms, mem = _baseline(spec)
            result = {"ms": ms, "mem": mem, "kernel": "torch"}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{impl}-{rank}.json"), "w") as handle:
        json.dump(result, handle)


def _spawn(spec: Any, impl: str, nprocs: int) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="df-bench-") as tmp:
        mp.start_processes(_worker, args=(spec, os.path.join(tmp, "store"), tmp, impl), nprocs=nprocs,
                           join=True, start_method="spawn")
        out = []
        for rank in range(nprocs):
            with open(os.path.join(tmp, f"{impl}-{rank}.json")) as handle:
                out.append(json.load(handle))
        return out


def run_benchmark(spec: BenchSpec, baseline: bool = True) -> list[BenchResult]:
    """Measure the sharded classifier (``spec.world_size`` gloo ranks, or in-process on a GPU) and the baseline."""
    results = []
    dtype = spec.dtype if spec.weight_dtype == "fp32" else f"{spec.dtype} (weights {spec.weight_dtype})"
    if spec.offload != "none":
        dtype += f", offload {spec.offload}"
    common = dict(world_size=spec.world_size, classes=spec.classes, batch_per_rank=spec.batch,
                  sample_rate=spec.sample_rate, dtype=dtype, device=spec.device)
    try:
        weight_dtype_kwargs(spec.weight_dtype)
    except UnsupportedSpec as err:  # say so in the table rather than fail the whole run
        logger.warning("skipped: %s", err)
        return [BenchResult("sharded", ms_per_step=float("nan"), peak_mem_mb=float("nan"),
                            note=f"skipped: {err}", **common)]
    if spec.device.startswith("cuda"):
        per_rank = [_sharded_rank(spec)]
    else:
        per_rank = _spawn(spec, "sharded", spec.world_size)
    slowest = max(per_rank, key=lambda p: p["ms"])
    results.append(BenchResult(f"sharded ({slowest['kernel']})", ms_per_step=slowest["ms"],
                               peak_mem_mb=max(p["mem"] for p in per_rank),
                               note="slowest rank; memory per rank", rows_per_step=slowest["rows"],
                               floor_ms=slowest.get("floor", float("nan")), profile=slowest.get("profile", ""),
                               **common))
    if baseline:
        try:
            if spec.device.startswith("cuda"):
                ms, mem = _baseline(spec)
            else:
                naive = _spawn(spec, "baseline", 1)[0]
                ms, mem = naive["ms"], naive["mem"]
            results.append(BenchResult("naive (1 process, whole matrix)", ms_per_step=ms, peak_mem_mb=mem,
                                       note=f"global batch {spec.batch * spec.world_size}", **common))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # the naive one may not fit: say so
            results.append(BenchResult("naive (1 process, whole matrix)", ms_per_step=float("nan"),
                                       peak_mem_mb=float("nan"), note=f"failed: {str(err).splitlines()[0][:80]}",
                                       **common))
    return results


def run_cases(spec: BenchSpec, cases: list[tuple[int, float]], baseline: bool = True,
              interleave: bool = False) -> list[BenchResult]:
    """:func:`run_benchmark` for each ``(classes, sample_rate)`` of ``cases``, one after the other; with
    ``interleave`` (CPU, world 1, no baseline) all cases in one process, timed round-robin."""
    if interleave:
        if spec.world_size != 1 or not spec.device.startswith("cpu"):
            raise ValueError("--interleave runs the cases in one CPU process: --world-size 1 --device cpu")
        specs = [dataclasses.replace(spec, classes=c, sample_rate=r) for c, r in cases]
        rows = _spawn(specs, "interleaved", 1)[0]
        out = []
        for case, row in zip(specs, rows):
            out.append(BenchResult(
                f"sharded ({row['kernel']})", world_size=1, classes=case.classes, batch_per_rank=case.batch,
                sample_rate=case.sample_rate, dtype=case.dtype, device=case.device, ms_per_step=row["ms"],
                peak_mem_mb=float("nan"), note="cases interleaved in one process", rows_per_step=row["rows"],
                floor_ms=row.get("floor", float("nan")), profile=row.get("profile", ""),
            ))
        return out
    results = []
    for classes, rate in cases:
        results += run_benchmark(dataclasses.replace(spec, classes=classes, sample_rate=rate), baseline=baseline)
    return results


def format_table(results: list[BenchResult]) -> str:
    """A Markdown table of the results; with several sharded rows, each one's time relative to the first.

    ``floor`` columns appear when the four-matmul floor was measured (``--floor``).
    """
    with_floor = any(math.isfinite(r.floor_ms) for r in results)
    first = next((r for r in results if r.impl.startswith("sharded")), None)
    head = ("| impl | device | world | classes | batch/rank | sample rate | rows/step | dtype | ms/step | "
            + ("4-matmul floor ms | step / floor | " if with_floor else "")
            + "vs first | peak MB/rank | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        floor = (f"{r.floor_ms:,.1f} | {r.ms_per_step / r.floor_ms:.2f}x | " if math.isfinite(r.floor_ms)
                 else "- | - | ") if with_floor else ""
        sharded = first is not None and r.impl.startswith("sharded")
        rel = f"{r.ms_per_step / first.ms_per_step:.2f}x" if sharded else "-"
        rows = f"{r.rows_per_step:,}" if r.rows_per_step else "-"
        lines.append(
            f"| {r.impl} | {r.device} | {r.world_size} | {r.classes:,} | {r.batch_per_rank} | {r.sample_rate:g} | "
            f"{rows} | {r.dtype} | {r.ms_per_step:,.1f} | {floor}{rel} | {_mb(r.peak_mem_mb)} | {r.note} |"
        )
    for r in results:
        if r.profile:
            lines += ["", f"Top operators, {r.classes:,} classes at rate {r.sample_rate:g} (2 steps, rank 0 of the "
                      "slowest):", "", "```", r.profile.rstrip(), "```"]
    return "\n".join(lines)


def _mb(value: float) -> str:
    return f"{value:,.0f}" if math.isfinite(value) else "-"


def results_as_dicts(results: list[BenchResult]) -> list[dict[str, Any]]:
    """JSON-ready form of the results."""
    return [dataclasses.asdict(r) for r in results]
