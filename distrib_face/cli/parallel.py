"""Subcommands of ``distrib_face.parallel``: ``bench classifier``, ``bench traffic``, ``bench grad-filter`` and
``reshard``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face bench classifier``, ``bench traffic``, ``bench grad-filter`` and ``reshard``."""
    t = groups["bench"].add_parser(
        "traffic", help="bytes one classifier step reads and writes, torch path vs fused kernels (computed, "
                        "not measured), and the resulting floor at a memory bandwidth")
    t.add_argument("--bandwidth", type=float, default=3.3e12, help="bytes per second (default 3.3e12, the H100 figure the docs quote)")
    t.set_defaults(func=_bench_traffic)
    g = groups["bench"].add_parser(
        "grad-filter", help="the fused backward's gradient filter: tiles skipped and the gradient error it makes")
    g.add_argument("--rows", type=int, default=256)
    g.add_argument("--classes", type=int, default=100_000)
    g.add_argument("--dim", type=int, default=512)
    g.add_argument("--eps", type=float, nargs="+", default=[2.0**-12, 2.0**-8])
    g.set_defaults(func=_bench_grad_filter)
    p = groups["bench"].add_parser(
        "classifier", help="ms/step and peak memory of the sharded classifier vs a naive whole-matrix baseline"
    )
    p.add_argument("--classes", required=True,
                   help="number of identities; a comma list (100000,1000000) runs several cases in one invocation")
    p.add_argument("--batch", type=int, default=256, help="batch per rank (the baseline runs the global batch)")
    p.add_argument("--embedding", type=int, default=512, help="embedding size")
    p.add_argument("--sample-rate", default="1.0",
                   help="Partial FC sample rate; a comma list gives one rate per --classes entry")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="matmul dtype")
    p.add_argument("--world-size", type=int, default=1, help="gloo ranks on this machine (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--chunk-size", type=int, default=65536, help="classes per logit chunk")
    p.add_argument("--margin", default="arcface", help="margin name")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"],
                   help="classifier kernel (auto: triton on CUDA when it imports)")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    p.add_argument("--floor", action="store_true",
                   help="also time the four matmuls of each step on the rows it uses (the floor of the fast path)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the top N operators of two steps of each case (torch.profiler, self CPU time)")
    p.add_argument("--threads", type=int, default=0, help="threads per rank (0: the cores shared out over the ranks)")
    p.add_argument("--interleave", action="store_true",
                   help="several cases in one process, timed round-robin (steady ratios on a shared machine)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="time steps by the wall clock or by the process's CPU time (stable on a shared machine)")
    p.add_argument("--weight-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="storage dtype of the class weights and their optimizer state")
    p.add_argument("--offload", default="none", choices=["none", "host"],
                   help="host: shard and optimizer state in host memory, rows in use moved to the device")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="the shard optimizer")
    p.add_argument("--plan", action="store_true",
                   help="print the memory plan (bytes per class per component, largest C that fits) instead of timing")
    p.add_argument("--device-memory", default="80GB", help="--plan: memory of one device (80GB, 80GiB, 24GB...)")
    p.add_argument("--reserve", default="0", help="--plan: device memory kept for the backbone and context")
    p.add_argument("--measure", action="store_true",
                   help="--plan: also run each case on this CPU and print the measured peak next to the plan")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench_classifier)

    r = sub.add_parser("reshard", help="rewrite classifier shard files for another number of ranks")
    r.add_argument("src", help="folder with classifier-RRRRR-of-WWWWW.pt files, or a checkpoint folder (step_N/)")
    r.add_argument("dst", help="empty output folder")
    r.add_argument("--world-size", type=int, required=True, help="new number of ranks (1: one merged matrix)")
    r.set_defaults(func=_reshard)


def _cases(classes: str, rates: str) -> list[tuple[int, float]]:
    try:
        counts = [int(c) for c in classes.split(",")]
        values = [float(r) for r in rates.split(",")]
    except ValueError as err:
        raise SystemExit(f"--classes / --sample-rate must be numbers or comma lists of numbers: {err}") from None
    if len(values) == 1:
        values *= len(counts)
    if len(values) != len(counts):
        raise SystemExit(f"--sample-rate has {len(values)} entries for {len(counts)} --classes entries")
    return list(zip(counts, values))


def _bench_classifier(args: argparse.Namespace) -> int:
    from distrib_face.parallel.bench import BenchSpec, format_table, results_as_dicts, run_cases

    cases = _cases(args.classes, args.sample_rate)
    spec = BenchSpec(
        classes=cases[0][0], batch=args.batch, embedding=args.embedding, sample_rate=cases[0][1],
        dtype=args.dtype, world_size=args.world_size, steps=args.steps, warmup=args.warmup,
        chunk_size=args.chunk_size, margin=args.margin, device=args.device, kernel=args.kernel, floor=args.floor,
        profile=args.profile, weight_dtype=args.weight_dtype, offload=args.offload, optimizer=args.optimizer,
        threads=args.threads, clock=args.clock,
    )
    if args.plan:
        return _plan(args, spec, cases)
    results = run_cases(spec, cases, baseline=not args.no_baseline and not args.interleave,
                        interleave=args.interleave)
    print(json.dumps(results_as_dicts(results), indent=2) if args.json else format_table(results))
    return 0


def _plan(args: argparse.Namespace, spec: object, cases: list[tuple[int, float]]) -> int:
    import dataclasses

    from distrib_face.parallel.bench import measure_peak
    from distrib_face.parallel.plan import PlanSpec, format_plan, format_plan_summary, make_plan, parse_bytes

    try:
        memory, reserve = parse_bytes(args.device_memory), parse_bytes(args.reserve)
    except ValueError as err:
        raise SystemExit(f"--device-memory / --reserve: {err}") from None
    plans, measured = [], []
    for classes, rate in cases:
        plan_spec = PlanSpec(classes=classes, embedding=args.embedding, batch=args.batch, world_size=args.world_size,
                             sample_rate=rate, weight_dtype=args.weight_dtype, offload=args.offload,
                             optimizer=args.optimizer, chunk_size=args.chunk_size)
        plans.append(make_plan(plan_spec, memory, reserve))
        if args.measure:
            measured.append(measure_peak(dataclasses.replace(spec, classes=classes, sample_rate=rate,
                                                             steps=2, warmup=1, floor=False, profile=0)))
    if args.json:
        rows = [{"classes": p.spec.classes, "sample_rate": p.spec.sample_rate, "device_bytes": p.device_total,
                 "host_bytes": p.host_total, "max_classes": p.max_classes,
                 "components": [dataclasses.asdict(c) for c in p.components]} for p in plans]
        for row, m in zip(rows, measured):
            row.update(m)
        print(json.dumps(rows, indent=2))
        return 0
    if len(plans) > 1 or measured:
        print(format_plan_summary(plans, measured))
        print()
    print(format_plan(plans[-1]))
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distrib_face.cli import CommandError, one_line
    from distrib_face.parallel.checkpoint import reshard

    src = Path(args.src)
    if not src.is_dir():
        raise CommandError(f"{src}: not a folder of classifier shard files" + ("" if src.exists() else " (it does not exist)"))
    if not any(src.glob("classifier-*-of-*.pt")):
        if (src / "classifier").is_dir() and any((src / "classifier").glob("classifier-*-of-*.pt")):
            src = src / "classifier"  # a training checkpoint (step_N/): its shards are in classifier/
        else:
            raise CommandError(f"{src}: no classifier shard files (classifier-RRRRR-of-WWWWW.pt) here or in "
                               f"{src / 'classifier'}; give a checkpoint folder (step_N) or its classifier/ folder")
    if args.world_size < 1:
        raise CommandError(f"--world-size must be >= 1, got {args.world_size}")
    try:
        written = reshard(src, args.dst, args.world_size)
    except (OSError, ValueError) as err:  # missing / damaged / refused shard files: the message names the file
        raise CommandError(one_line(err)) from err
    print(f"wrote {len(written)} shard file(s) to {args.dst}")
    return 0


def _bench_traffic(args: argparse.Namespace) -> int:
    from distrib_face.parallel.kernels.traffic import table

    print(table(args.bandwidth))
    return 0


def _bench_grad_filter(args: argparse.Namespace) -> int:
    from distrib_face.parallel.kernels.filter_study import format_study

    print(format_study(args.rows, args.classes, args.dim, tuple(args.eps)))
    return 0
