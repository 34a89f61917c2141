"""``distrib-face bench scale`` (synth -> data verify -> train on 2 ranks -> reshard 2 -> 3 -> resume on 3 ranks
-> eval, each phase the real command, with its wall time, peak RSS of its whole process tree and img/s:
:mod:`distrib_face.train.scale`) and ``distrib-face bench workers`` (``synth`` and ``pack`` at 1, 2, ...
workers: :mod:`distrib_face.train.workers_bench`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face bench scale`` and ``distrib-face bench workers``."""
    p = groups["bench"].add_parser(
        "scale", help="the million-identity run end to end: wall time, peak RSS and img/s of every phase",
        description="synth (or --shards) -> data verify -> train on 2 gloo ranks (Partial FC) -> checkpoint -> "
        "reshard 2 -> 3 -> resume on 3 ranks -> eval; every phase runs as its own command and is measured "
        "with its whole process tree.",
    )
    p.add_argument("--identities", type=int, default=1_000_000, help="synthetic training identities (default 1M)")
    p.add_argument("--shards", default=None, help="train on this existing shard set instead of synthesising one")
    p.add_argument("--out", default="bench_scale_out", help="output folder (default bench_scale_out)")
    p.add_argument("--steps", type=int, default=50, help="steps on 2 ranks before the checkpoint (default 50)")
    p.add_argument("--resume-steps", type=int, default=20, help="steps on 3 ranks after the reshard (default 20)")
    p.add_argument("--image-size", type=int, default=16, help="image side (default 16)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per rank per step (default 64)")
    p.add_argument("--sample-rate", type=float, default=0.1, help="Partial FC sample rate (default 0.1)")
    p.add_argument("--embedding", type=int, default=128, help="embedding size (default 128)")
    p.add_argument("--backbone", default="iresnet_tiny", help="backbone (default iresnet_tiny)")
    p.add_argument("--min-images", type=int, default=1, help="fewest images of an identity (default 1)")
    p.add_argument("--max-images", type=int, default=4, help="most images of an identity (default 4)")
    p.add_argument("--zipf-a", type=float, default=1.5, help="Zipf exponent of images per identity (default 1.5)")
    p.add_argument("--holdout", type=int, default=50, help="held-out identities of the eval pairs (default 50)")
    p.add_argument("--pairs", type=int, default=600, help="held-out verification pairs (default 600)")
    p.add_argument("--workers", type=int, default=2, help="processes of synth and data verify (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds one phase may take (default 6 h)")
    p.add_argument("--overwrite", action="store_true", help="reuse --out even if it holds an earlier run")
    p.set_defaults(func=_bench_scale)

    w = groups["bench"].add_parser("workers", help="synth and pack at 1, 2, ... --workers: wall s, CPU s, speed-up")
    w.add_argument("--out", default="bench_workers_out", help="scratch folder (emptied; default bench_workers_out)")
    w.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    w.add_argument("--identities-16", type=int, default=3450, help="identities of the 16 px synth (~50k images)")
    w.add_argument("--identities-112", type=int, default=690, help="identities of the 112 px synth (~10k images)")
    w.add_argument("--pack-identities", type=int, default=3450, help="identities of pack's 112 px folder (~50k)")
    w.add_argument("--repeat", type=int, default=1,
                   help="runs of each row, interleaved; the fastest is kept (a shared machine; default 1)")
    w.set_defaults(func=_bench_workers)


def _bench_scale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distrib_face.cli import CommandError
    from distrib_face.train.scale import ScaleSpec, format_scale_table, run_bench_scale

    try:
        spec = ScaleSpec(identities=args.identities, shards=args.shards, out=args.out, steps=args.steps,
                         resume_steps=args.resume_steps, image_size=args.image_size, batch_size=args.batch_size,
                         sample_rate=args.sample_rate, embedding_size=args.embedding, backbone=args.backbone,
                         min_images=args.min_images, max_images=args.max_images, zipf_a=args.zipf_a,
                         holdout=args.holdout, pairs=args.pairs, workers=args.workers, seed=args.seed,
                         timeout=args.timeout, overwrite=args.overwrite)
    except ValueError as err:
        raise CommandError(str(err)) from err
    if spec.shards is not None and not Path(spec.shards).exists():
        raise CommandError(f"--shards {spec.shards}: no such shard folder")
    try:
        result = run_bench_scale(spec)
    except FileExistsError as err:
        raise CommandError(str(err)) from err
    print(format_scale_table(result))
    return 0


def _bench_workers(args: argparse.Namespace) -> int:
    import os

    from distrib_face.cli import CommandError
    from distrib_face.train.workers_bench import format_workers_table, run_workers_bench

    try:
        counts = [int(v) for v in args.workers.split(",") if v.strip()]
    except ValueError as err:
        raise CommandError(f"--workers must be comma-separated integers, got {args.workers!r}") from err
    if not counts or min(counts) < 1:
        raise CommandError(f"--workers must list counts >= 1, got {args.workers!r}")
    before = os.getloadavg()
    rows = run_workers_bench(args.out, workers=counts, identities_16=args.identities_16,
                             identities_112=args.identities_112, pack_identities=args.pack_identities,
                             repeat=max(1, args.repeat))
    print(f"load average before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, after "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(format_workers_table(rows))
    return 0
