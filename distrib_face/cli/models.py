"""Subcommands of ``distrib_face.models``: ``bench backbones`` (parameters, MACs, training img/s)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face bench backbones``."""
    p = groups["bench"].add_parser("backbones", help="parameters, GMACs and (optionally) training img/s per backbone")
    p.add_argument("names", nargs="*", help="backbone names (default: all registered)")
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--throughput", action="store_true", help="also time forward+backward on random images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.set_defaults(func=_bench_backbones)


def _bench_backbones(args: argparse.Namespace) -> int:
    import torch

    from distrib_face.cli import CommandError
    from distrib_face.models.profile import profile_table
    from distrib_face.models.registry import list_backbones

    unknown = [name for name in args.names if name not in list_backbones()]
    if unknown:
        raise CommandError(f"unknown backbone {unknown[0]!r}; registered: {', '.join(list_backbones())}")

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = profile_table(args.names or list_backbones(), args.input_size, args.throughput, args.batch_size)
    header = f"{'backbone':<20} {'params (M)':>11} {'GMACs':>8}"
    if args.throughput:
        header += f" {'train img/s':>12}"
    print(f"input {args.input_size}x{args.input_size}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(header)
    for row in rows:
        line = f"{row['name']:<20} {row['params_m']:>11.3f} {row['gmacs']:>8.3f}"
        if args.throughput:
            line += f" {row['img_per_s_train']:>12.1f}"
        print(line)
    return 0
