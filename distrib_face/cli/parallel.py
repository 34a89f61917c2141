"""Subcommands of ``distrib_face.parallel``: ``bench classifier`` and ``reshard``."""

from __future__ import annotations

import argparse
import json
import sys


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
    p.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_bench_classifier)

    r = sub.add_parser("reshard", help="rewrite classifier shard files for another number of ranks")
    r.add_argument("src", help="folder with classifier-RRRRR-of-WWWWW.pt files")
    r.add_argument("dst", help="empty output folder")
    r.add_argument("--world-size", type=int, required=True, help="new number of ranks (1: one merged matrix)")
    r.set_defaults(func=_reshard)


def _bench_classifier(args: argparse.Namespace) -> int:
    from distrib_face.parallel.bench import BenchSpec, format_table, results_as_dicts, run_benchmark

    spec = BenchSpec(
        classes=args.classes, batch=args.batch, embedding=args.embedding, sample_rate=args.sample_rate,
        dtype=args.dtype, world_size=args.world_size, steps=args.steps, warmup=args.warmup,
        chunk_size=args.chunk_size, margin=args.margin, device=args.device,
    )
    results = run_benchmark(spec, baseline=not args.no_baseline)
    print(json.dumps(results_as_dicts(results), indent=2) if args.json else format_table(results))
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from distrib_face.parallel.checkpoint import reshard

    try:
        written = reshard(args.src, args.dst, args.world_size)
    except (OSError, ValueError) as err:  # missing / damaged / refused shard files: the message names the file
        print(f"distrib-face reshard: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} shard file(s) to {args.dst}")
    return 0
