"""Subcommands of ``distrib_face.parallel``: ``bench classifier`` and ``reshard``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face bench classifier`` and ``distrib-face reshard``."""
    p = groups["bench"].add_parser(
        "classifier", help="ms/step and peak memory of the sharded classifier vs a naive whole-matrix baseline"
    )
    p.add_argument("--classes", type=int, required=True, help="number of identities")
    p.add_argument("--batch", type=int, default=256, help="batch per rank (the baseline runs the global batch)")
    p.add_argument("--embedding", type=int, default=512, help="embedding size")
    p.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="matmul dtype")
    p.add_argument("--world-size", type=int, default=1, help="gloo ranks on this machine (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--chunk-size", type=int, default=65536, help="classes per logit chunk")
    p.add_argument("--margin", default="arcface", help="margin name")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"],
                   help="classifier kernel (auto: triton on CUDA when it imports)")
    p.add_argument("--weight-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="storage dtype of the class weights (other than fp32: when the classifier supports it)")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench_classifier)

    r = sub.add_parser("reshard", help="rewrite classifier shard files for another number of ranks")
    r.add_argument("src", help="folder with classifier-RRRRR-of-WWWWW.pt files, or a checkpoint folder (step_N/)")
    r.add_argument("dst", help="empty output folder")
    r.add_argument("--world-size", type=int, required=True, help="new number of ranks (1: one merged matrix)")
    r.set_defaults(func=_reshard)


def _bench_classifier(args: argparse.Namespace) -> int:
    from distrib_face.parallel.bench import BenchSpec, format_table, results_as_dicts, run_benchmark

    spec = BenchSpec(
        classes=args.classes, batch=args.batch, embedding=args.embedding, sample_rate=args.sample_rate,
        dtype=args.dtype, world_size=args.world_size, steps=args.steps, warmup=args.warmup,
        chunk_size=args.chunk_size, margin=args.margin, device=args.device, kernel=args.kernel,
        weight_dtype=args.weight_dtype,
    )
    results = run_benchmark(spec, baseline=not args.no_baseline)
    print(json.dumps(results_as_dicts(results), indent=2) if args.json else format_table(results))
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
