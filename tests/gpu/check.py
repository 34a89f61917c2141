"""Part 1 of the GPU check, in one command: the CUDA tests of the kernels and the classifier, the
classifier benchmarks, the iresnet50 and full-step benchmarks, and one JSON + one markdown table beside
the reference numbers of ../shared/GPU.md. See docs/testing.md for the exact ``run`` call.

    python tests/gpu/check.py --out DIR [--budget-s 330]      # on the GPU (via tests/gpu/run.sh part1)
    python tests/gpu/check.py --out DIR --dry-run             # here, on CPU: the same code paths, tiny sizes

It needs only torch (2.11 on the GPU image), triton and the small wheels of tests/gpu/wheels.sh. Every
stage runs in a child process with a timeout taken from what is left of ``--budget-s`` (the whole part
must fit in 6 minutes of a 15-minute lease); a stage that does not fit is skipped with the reason, and
the report is rewritten after each stage so that a cut-off run still leaves its numbers. The dry run also
hides the packages the GPU image lacks (Ray, MLflow, DALI, matplotlib, scikit-learn) from every child, so
an import that would fail there fails here first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: Not on the lent GPU image (../shared/GPU.md): the dry run makes them unimportable.
ABSENT_ON_IMAGE = ("ray", "mlflow", "nvidia.dali", "matplotlib", "sklearn", "scipy", "insightface")

# ../shared/GPU.md, measured on an H100 with insightface arcface_torch (batch 256): what to beat.
REFERENCE = {
    "clf 1M r1.0": "50.8 ms, 13.4 GB", "clf 1M r1.0 bf16 weights": "50.8 ms, 13.4 GB (fp32)",
    "clf 2M r1.0": "98 ms, 26.8 GB", "clf 4M r1.0": "192 ms, 53.5 GB",
    "clf 8M r0.1": "163 ms, 61.1 GB", "clf 16M r0.1": "out of memory", "clf 32M r0.1": "-",
    "r50 fp16": "2,426 img/s, 9.0 GB", "r50 bf16 cl": "2,972 img/s", "r50 bf16 cl compile": "3,312 img/s",
    "step 2M r0.2 fp16": "1,598 img/s, 21.2 GB", "step 2M r0.2 bf16 cl": "1,598 img/s (fp16)",
    "step 2M r0.2 bf16 cl compile": "1,598 img/s (fp16)",
}
# 6 GB at 1M classes needs bf16 storage (fp32 weights, momentum and gradient are 2 GB each): the memory half
# of the target belongs to the bf16-weight row, the time half to both.
TARGET = {"clf 1M r1.0": "<= 10 ms", "clf 1M r1.0 bf16 weights": "<= 10 ms, <= 6 GB",
          "step 2M r0.2 bf16 cl": ">= 3,500 img/s",
          "step 2M r0.2 bf16 cl compile": ">= 3,500 img/s"}

# (name, classes, sample rate, weight dtype, kernel); all batch 256, 512-d, bf16 matmuls, ArcFace.
CLASSIFIER_ROWS = [
    ("clf 1M r1.0", 1_000_000, 1.0, "fp32", "auto"),
    ("clf 1M r1.0 bf16 weights", 1_000_000, 1.0, "bf16", "auto"),
    ("clf 1M r1.0 torch path", 1_000_000, 1.0, "fp32", "torch"),
    ("clf 2M r1.0", 2_000_000, 1.0, "fp32", "auto"),
    ("clf 4M r1.0", 4_000_000, 1.0, "fp32", "auto"),
    ("clf 8M r0.1", 8_000_000, 0.1, "bf16", "auto"),
    ("clf 16M r0.1", 16_000_000, 0.1, "bf16", "auto"),
    ("clf 32M r0.1", 32_000_000, 0.1, "bf16", "auto"),
]
_BASE = ["data.source=random", "data.random_num_samples=4096", "data.batch_size=256", "tracking.enabled=false"]
# (name, overrides, seconds it may need at most); iresnet50, ms1mv3 preset, no data loading, in priority order.
TRAIN_ROWS = [
    ("step 2M r0.2 bf16 cl", ["data.random_num_classes=2000000", "loss.sample_rate=0.2", "deepspeed.precision=bf16",
                              "loss.compute_dtype=bf16", "model.channels_last=true"], 90),
    ("step 2M r0.2 fp16", ["data.random_num_classes=2000000", "loss.sample_rate=0.2", "deepspeed.precision=fp16"], 80),
    ("r50 fp16", ["data.random_num_classes=1000", "deepspeed.precision=fp16"], 70),
    ("r50 bf16 cl compile", ["data.random_num_classes=1000", "deepspeed.precision=bf16", "model.channels_last=true",
                             "model.compile=true"], 150),
    ("step 2M r0.2 bf16 cl compile", ["data.random_num_classes=2000000", "loss.sample_rate=0.2",
                                      "deepspeed.precision=bf16", "loss.compute_dtype=bf16",
                                      "model.channels_last=true", "model.compile=true"], 150),
]
GPU_TESTS = ["tests/gpu/test_triton_gpu.py", "tests/gpu/test_classifier_gpu.py"]


# ----------------------------------------------------------------------------------------------------------
# Stages run in children (``--stage``)
# ----------------------------------------------------------------------------------------------------------
def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _kernel_agreement(classes: int, device: str, dry_run: bool) -> dict[str, Any]:
    """The autotuned bf16 kernels at a benchmark's size, same weights and batch, against the fp32 torch path,
    beside the bf16 torch path's own distance to it (which also rounds each logit to bf16): ``ok`` when the
    kernel is no further from fp32 than the torch path is."""
    import torch

    from distrib_face.parallel import ShardedMarginClassifier

    grads = {}
    for name, kernel, compute in (("triton bf16", "triton", torch.bfloat16), ("torch bf16", "torch", torch.bfloat16),
                                  ("torch fp32", "torch", None)):
        clf = ShardedMarginClassifier(classes, 512 if not dry_run else 40, margin="arcface", device=device,
                                      compute_dtype=compute, seed=1, kernel=kernel)
        gen = torch.Generator(device=device).manual_seed(5)
        emb = torch.randn(256 if not dry_run else 24, clf.embedding_size, device=device, generator=gen)
        labels = torch.randint(0, classes, (emb.shape[0],), device=device, generator=gen)
        emb.requires_grad_(True)
        loss = clf(emb, labels)
        loss.backward()
        grads[name] = (loss.detach(), emb.grad, clf.weight.grad)  # kept on the device: 2 GB at 1M classes
        del clf
    ref = grads["torch fp32"]
    out: dict[str, Any] = {}
    for name in ("triton bf16", "torch bf16"):
        got = grads[name]
        out[f"{name}: loss"] = float((got[0] - ref[0]).abs() / ref[0].abs())
        out[f"{name}: d emb"] = float((got[1] - ref[1]).norm() / ref[1].norm())
        out[f"{name}: d W"] = float((got[2] - ref[2]).norm() / ref[2].norm())
    out["ok"] = all(out[f"triton bf16: {k}"] <= 1.5 * out[f"torch bf16: {k}"] + 1e-3 for k in ("loss", "d emb", "d W"))
    return out


def stage_classifier(out_dir: Path, dry_run: bool) -> None:
    import torch

    from distrib_face.parallel.bench import BenchSpec, results_as_dicts, run_benchmark

    device = "cpu" if dry_run else "cuda"
    record_path = out_dir / "classifier.jsonl"
    try:
        check = _kernel_agreement(2000 if dry_run else 1_000_000, device, dry_run)
        _append(record_path, {"name": "bf16 vs fp32 at 1M classes (rel.)", **check})
    except Exception as err:  # noqa: BLE001 - reported, and the timings still run
        _append(record_path, {"name": "bf16 vs fp32 at 1M classes (rel.)", "error": repr(err)[-800:]})
    for name, classes, rate, weight_dtype, kernel in CLASSIFIER_ROWS:
        if dry_run:
            classes = max(300, classes // 4000)
        spec = BenchSpec(classes=classes, batch=256 if not dry_run else 24, embedding=512 if not dry_run else 40,
                         sample_rate=rate, dtype="bf16", steps=20 if not dry_run else 2, warmup=5 if not dry_run else 1,
                         device=device, kernel=kernel if not dry_run or kernel == "torch" else "triton",
                         weight_dtype=weight_dtype)
        started = time.perf_counter()
        try:
            results = results_as_dicts(run_benchmark(spec, baseline=False))
            _append(record_path, {"name": name, **results[0], "wall_s": time.perf_counter() - started})
        except Exception as err:  # noqa: BLE001 - out of memory at 32M, say: recorded, next row
            _append(record_path, {"name": name, "error": repr(err)[-800:], "wall_s": time.perf_counter() - started})
        if device == "cuda":
            torch.cuda.empty_cache()
    try:
        from distrib_face.parallel.kernels.triton_lse import chosen_configs

        _append(record_path, {"name": "autotuned tiles", **chosen_configs()})
    except Exception as err:  # noqa: BLE001
        _append(record_path, {"name": "autotuned tiles", "error": repr(err)[:300]})


def stage_train(out_dir: Path, dry_run: bool, name: str, overrides: list[str]) -> None:
    from distrib_face.config import load_config
    from distrib_face.parallel import init_distributed
    from distrib_face.train.bench import bench_train

    overrides = _BASE + list(overrides)
    if dry_run:  # the same path at a size the 2-core CPU runs in seconds; fp16 and compile do not run on CPU
        swap = {"deepspeed.precision=fp16": "deepspeed.precision=bf16", "model.compile=true": "model.compile=false"}
        overrides = [swap.get(o, o) for o in overrides if not o.startswith("data.random_num_classes")]
        overrides += ["device=cpu", "ray.use_gpu=false", "data.batch_size=2", "data.random_num_samples=8",
                      "data.random_num_classes=300"]
    cfg = load_config(ROOT / "configs" / "ms1mv3_r50_arcface.yaml", overrides)
    ctx = init_distributed(device=cfg.device)
    started = time.perf_counter()
    result = bench_train(cfg, ctx, steps=20 if not dry_run else 1, warmup=5 if not dry_run else 1, with_data=False)
    _append(out_dir / "train.jsonl", {"name": name, "overrides": overrides, **result,
                                      "wall_s": time.perf_counter() - started})


# ----------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------
class Clock:
    """What is left of the budget."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _blocker_dir() -> str:
    """A folder of stand-ins for the packages the GPU image lacks: importing one raises ModuleNotFoundError.

    Stand-in packages rather than an import hook: ``importlib.util.find_spec`` (torch._dynamo probes
    optional packages with it) keeps working, while ``import ray`` fails as it would on the image.
    """
    folder = Path(tempfile.mkdtemp(prefix="df-gpu-image-"))
    for name in ABSENT_ON_IMAGE:
        package = folder.joinpath(*name.split("."))
        package.mkdir(parents=True, exist_ok=True)
        if "." in name:  # a parent such as nvidia: stays importable, its other sub-packages found further on
            (package.parent / "__init__.py").write_text(
                "from pkgutil import extend_path\n__path__ = extend_path(__path__, __name__)\n")
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError({name!r} + ' is not on the GPU image (tests/gpu/check.py --dry-run)', "
            f"name={name!r})\n"
        )
    return str(folder)


def _child_env(dry_run: bool, blocker: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    path = [str(ROOT)] + ([blocker] if blocker else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # the triton rows run through the interpreter on CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # the image's 9.0a breaks DeepSpeed's JIT parser
    return env


def _run(cmd: list[str], timeout: float, env: dict[str, str], log: Path) -> dict[str, Any]:
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}  (timeout {timeout:.0f} s)\n")
        handle.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"rc": rc, "wall_s": round(time.perf_counter() - started, 1)}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tail(path: Path, lines: int = 3) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""


def _environment(dry_run: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "dry_run": dry_run}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    except Exception as err:  # noqa: BLE001
        info["torch"] = repr(err)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        info["triton"] = f"not importable: {err}"
    return info


def _fmt_gb(mb: Any) -> str:
    return "-" if mb is None or (isinstance(mb, float) and math.isnan(mb)) else f"{mb / 1024:.1f} GB"


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """gpu_check.json (everything) and gpu_check.md (one table with the references and targets)."""
    report["classifier"] = _read_jsonl(out_dir / "classifier.jsonl")
    report["train"] = _read_jsonl(out_dir / "train.jsonl")
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    env = report["environment"]
    lines = [f"# GPU check, part 1{' (DRY RUN on CPU: tiny sizes, not a measurement)' if env['dry_run'] else ''}",
             "", f"{env.get('gpu', 'no GPU')}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"Python {env['python']}", ""]
    tests = report.get("tests") or {}
    lines += [f"tests ({', '.join(GPU_TESTS)}): rc {tests.get('rc')}, {tests.get('summary', '')}", ""]
    lines += ["| what | ours | reference (arcface_torch, H100, ../shared/GPU.md) | target | note |", "|---|---|---|---|---|"]
    for row in report["classifier"]:
        name = row["name"]
        if "ms_per_step" not in row:
            detail = row.get("error") or ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items() if k != "name")
            lines.append(f"| {name} | - | - | - | {str(detail)[:160]} |")
            continue
        ours = ("skipped" if math.isnan(row["ms_per_step"]) else f"{row['ms_per_step']:.1f} ms, {_fmt_gb(row['peak_mem_mb'])}")
        note = f"{row['impl']}, {row['classes']:,} classes, rate {row['sample_rate']:g}; {row['note']}"
        lines.append(f"| {name} | {ours} | {REFERENCE.get(name, '-')} | {TARGET.get(name, '-')} | {note} |")
    done = {row["name"] for row in report["classifier"]}
    if "classifier" in report.get("stages", {}):  # rows a cut-off stage did not reach
        for name, *_ in CLASSIFIER_ROWS:
            if name not in done:
                lines.append(f"| {name} | not reached | {REFERENCE.get(name, '-')} | {TARGET.get(name, '-')} | "
                             f"classifier stage: {report['stages']['classifier']} |")
    for row in report["train"]:
        name = row["name"]
        rate = f"{row['images_per_sec']:,.0f}" if row["images_per_sec"] >= 100 else f"{row['images_per_sec']:.3g}"
        ours = f"{rate} img/s, {row['median_step_ms']:.1f} ms, {_fmt_gb(row['peak_memory_mb'])}"
        lines.append(f"| {name} | {ours} | {REFERENCE.get(name, '-')} | {TARGET.get(name, '-')} | "
                     f"global batch {row['global_batch']} |")
    for name, why in report.get("skipped", []):
        lines.append(f"| {name} | skipped | {REFERENCE.get(name, '-')} | {TARGET.get(name, '-')} | {why} |")
    lines += ["", f"stages: {json.dumps(report.get('stages', {}))}", ""]
    (out_dir / "gpu_check.md").write_text("\n".join(lines))


def drive(out_dir: Path, budget_s: float, dry_run: bool) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("classifier.jsonl", "train.jsonl", "check.log"):
        (out_dir / stale).unlink(missing_ok=True)
    clock = Clock(budget_s)
    blocker = _blocker_dir() if dry_run else None
    env = _child_env(dry_run, blocker)
    log = out_dir / "check.log"
    report: dict[str, Any] = {"environment": _environment(dry_run), "budget_s": budget_s, "stages": {},
                              "skipped": []}
    write_report(out_dir, report)
    me = [sys.executable, str(Path(__file__).resolve()), "--out", str(out_dir)] + (["--dry-run"] if dry_run else [])

    # 1. the CUDA tests of the kernels and the classifier (skipped as a whole by tests/gpu/conftest.py on CPU)
    tests_log = out_dir / "tests.log"
    tests_log.unlink(missing_ok=True)
    # one tile configuration per kernel here (fewer compilations); the benchmarks below autotune
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS],
                  max(30.0, min(120.0, clock.left() - 200)), dict(env, DISTRIB_FACE_TRITON_AUTOTUNE="0"), tests_log)
    result["summary"] = _tail(tests_log, 1)
    report["tests"] = report["stages"]["tests"] = result
    write_report(out_dir, report)

    # 2. the classifier benchmarks, one process (one CUDA context, kernels compiled and tuned once)
    if clock.left() > 60:
        cap = 400.0 if dry_run else 120.0  # the interpreter's tiles are slow; on the GPU ~1 min is expected
        report["stages"]["classifier"] = _run(me + ["--stage", "classifier"], min(cap, clock.left() - 45), env, log)
    else:
        report["skipped"].append(("classifier benchmarks", f"{clock.left():.0f} s left"))
    write_report(out_dir, report)

    # 3. the full step and the backbone, one process each, most important first
    for name, overrides, need_s in TRAIN_ROWS:
        if clock.left() < min(need_s, 60) + 5:
            report["skipped"].append((name, f"needs ~{need_s} s, {clock.left():.0f} s left"))
            continue
        report["stages"][name] = _run(me + ["--stage", "train", "--name", name, "--set", *overrides],
                                      clock.left() - 5, env, log)
        write_report(out_dir, report)
    write_report(out_dir, report)
    print((out_dir / "gpu_check.md").read_text())
    return 0 if report["tests"]["rc"] in (0, 5) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the logs")
    parser.add_argument("--budget-s", type=float, default=330.0, help="seconds the whole part 1 may take")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, GPU-image packages hidden")
    parser.add_argument("--stage", choices=["classifier", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--set", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.stage == "classifier":
        stage_classifier(out_dir, args.dry_run)
        return 0
    if args.stage == "train":
        stage_train(out_dir, args.dry_run, args.name, args.set)
        return 0
    return drive(out_dir, args.budget_s, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
