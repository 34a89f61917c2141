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
import logging
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
    weight_dtype: str = "fp32"
    """Storage dtype of the class weights; other than fp32 it needs the classifier's ``weight_dtype``."""

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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step_fn: Any, spec: BenchSpec, device: torch.device) -> list[float]:
    for _ in range(spec.warmup):
        step_fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec.steps):
        _sync(device)
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _memory_mb(device: torch.device, rss_before: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mb() - rss_before


class UnsupportedSpec(RuntimeError):
    """A benchmark row this version of the classifier cannot run (reported as skipped, with the reason)."""


def weight_dtype_kwargs(weight_dtype: str) -> dict[str, Any]:
    """``ShardedMarginClassifier`` keyword arguments for a weight storage dtype (``{}`` for fp32).

    Raises:
        UnsupportedSpec: the classifier has no ``weight_dtype`` argument (yet).
    """
    import inspect

    from distrib_face.parallel.classifier import ShardedMarginClassifier

    if weight_dtype == "fp32":
        return {}
    if "weight_dtype" not in inspect.signature(ShardedMarginClassifier.__init__).parameters:
        raise UnsupportedSpec(f"weight_dtype={weight_dtype}: ShardedMarginClassifier has no weight_dtype argument")
    return {"weight_dtype": parse_dtype(weight_dtype, "--weight-dtype")}


def _sharded_rank(spec: BenchSpec, group: Any = None) -> tuple[float, float, str]:
    from distrib_face.losses import create_margin
    from distrib_face.parallel.classifier import ShardedMarginClassifier
    from distrib_face.parallel.kernels import resolve_kernel
    from distrib_face.parallel.optim import ShardOptimizer

    device = torch.device(spec.device)
    extra = weight_dtype_kwargs(spec.weight_dtype)
    rss_before = _current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clf = ShardedMarginClassifier(
        spec.classes, spec.embedding, margin=create_margin(spec.margin), sample_rate=spec.sample_rate,
        group=group, device=device, chunk_size=spec.chunk_size, compute_dtype=_compute_dtype(spec.dtype),
        kernel=spec.kernel, **extra,
    )
    opt = ShardOptimizer(clf, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(device=device).manual_seed(1234 + clf.rank)
    emb = torch.randn(spec.batch, spec.embedding, device=device, generator=gen).requires_grad_(True)
    labels = torch.randint(0, spec.classes, (spec.batch,), device=device, generator=gen)

    def step() -> None:
        loss = clf(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    times = _timed(step, spec, device)
    used = "torch"
    if clf.margin.linear_scale is not None and clf.num_subcenters == 1 and not clf.bias_columns:
        used = resolve_kernel(spec.kernel, emb, clf.weight, clf.compute_dtype)
    return statistics.median(times), _memory_mb(device, rss_before), used


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
        ctx = MarginContext(feature_norms=emb.norm(dim=1, keepdim=True))
        logits = margin.negative_logits(cos, ctx).index_put((rows, labels), margin.target_logit(cos[rows, labels], ctx))
        F.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    times = _timed(step, spec, device)
    return statistics.median(times), _memory_mb(device, rss_before)


def _worker(rank: int, spec: BenchSpec, store: str, out_dir: str, impl: str) -> None:
    threads = max(1, (os.cpu_count() or 1) // spec.world_size)
    torch.set_num_threads(threads)
    group = None
    if impl == "sharded" and spec.world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(spec.world_size))
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=spec.world_size)
    try:
        ms, mem, used = _sharded_rank(spec, group) if impl == "sharded" else (*_baseline(spec), "torch")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{impl}-{rank}.txt"), "w") as handle:
        handle.write(f"{ms} {mem} {used}\n")


def _spawn(spec: BenchSpec, impl: str, nprocs: int) -> list[tuple[float, float, str]]:
    with tempfile.TemporaryDirectory(prefix="df-bench-") as tmp:
        mp.start_processes(_worker, args=(spec, os.path.join(tmp, "store"), tmp, impl), nprocs=nprocs,
                           join=True, start_method="spawn")
        out = []
        for rank in range(nprocs):
            with open(os.path.join(tmp, f"{impl}-{rank}.txt")) as handle:
                ms, mem, used = handle.read().split()
            out.append((float(ms), float(mem), used))
        return out


def run_benchmark(spec: BenchSpec, baseline: bool = True) -> list[BenchResult]:
    """Measure the sharded classifier (``spec.world_size`` gloo ranks, or in-process on a GPU) and the baseline."""
    results = []
    common = dict(world_size=spec.world_size, classes=spec.classes, batch_per_rank=spec.batch,
                  sample_rate=spec.sample_rate, dtype=spec.dtype, device=spec.device)
    weights = "" if spec.weight_dtype == "fp32" else f", {spec.weight_dtype} weights"
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
    results.append(BenchResult(f"sharded ({per_rank[0][2]})", ms_per_step=max(p[0] for p in per_rank),
                               peak_mem_mb=max(p[1] for p in per_rank),
                               note=f"slowest rank; memory per rank{weights}", **common))
    if baseline:
        try:
            ms, mem = _baseline(spec) if spec.device.startswith("cuda") else _spawn(spec, "baseline", 1)[0][:2]
            results.append(BenchResult("naive (1 process, whole matrix)", ms_per_step=ms, peak_mem_mb=mem,
                                       note=f"global batch {spec.batch * spec.world_size}", **common))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # the naive one may not fit: say so
            results.append(BenchResult("naive (1 process, whole matrix)", ms_per_step=float("nan"),
                                       peak_mem_mb=float("nan"), note=f"failed: {str(err).splitlines()[0][:80]}",
                                       **common))
    return results


def format_table(results: list[BenchResult]) -> str:
    """A Markdown table of the results."""
    head = "| impl | device | world | classes | batch/rank | sample rate | dtype | ms/step | peak MB/rank | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r.impl} | {r.device} | {r.world_size} | {r.classes:,} | {r.batch_per_rank} | {r.sample_rate:g} | "
            f"{r.dtype} | {r.ms_per_step:,.1f} | {r.peak_mem_mb:,.0f} | {r.note} |"
        )
    return "\n".join(lines)


def results_as_dicts(results: list[BenchResult]) -> list[dict[str, Any]]:
    """JSON-ready form of the results."""
    return [dataclasses.asdict(r) for r in results]
