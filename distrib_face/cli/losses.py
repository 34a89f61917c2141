"""Subcommands of ``distrib_face.losses``: margin pictures, the toy, sub-centre cleaning."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``plot margins``, ``toy`` and ``clean-subcenters``."""
    plot = groups["plot"].add_parser("margins", help="target logit / scale against theta for every margin (PNG)")
    plot.add_argument("--output", default="margins.png", help="PNG path (default margins.png)")
    plot.set_defaults(func=_plot_margins)

    toy = sub.add_parser("toy", help="train a tiny net with 2-D / 3-D embeddings on 8 identities; one PNG per loss")
    toy.add_argument("--loss", action="append", required=True,
                     help="margin name (repeatable; 'all' for every registered margin)")
    toy.add_argument("--output", required=True, help="folder for toy_<loss>.png")
    toy.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    toy.add_argument("--dim", type=int, choices=(2, 3), default=2, help="embedding dimension (default 2)")
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(func=_toy)

    clean = sub.add_parser(
        "clean-subcenters",
        help="sub-centre ArcFace: keep each class's dominant sub-centre, list samples beyond a threshold angle",
    )
    source = clean.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="classifier shard folder (any world size) of a subcenter_arcface run")
    source.add_argument("--weights", help=".npy file of the [C, K, D] sub-centre weights")
    clean.add_argument("--embeddings", required=True,
                       help=".npz with 'embeddings' [N, D], 'labels' [N] and optionally 'keys' [N] (sample names)")
    clean.add_argument("--threshold", type=float, default=75.0, help="angle in degrees (default 75, the paper's)")
    clean.add_argument("--output", required=True,
                       help="folder: noisy.csv (index,key,label,angle_degrees) and dominant.npz "
                            "(dominant, counts, weight)")
    clean.set_defaults(func=_clean_subcenters)


def _plot_margins(args: argparse.Namespace) -> int:
    from distrib_face.losses.plots import plot_margin_curves

    print(plot_margin_curves(args.output))
    return 0


def _toy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distrib_face.losses.margins import list_margins
    from distrib_face.train.toy import angular_gap_degrees, plot_toy, train_toy

    import torch

    names = list_margins() if "all" in args.loss else args.loss
    from distrib_face.cli import CommandError

    unknown = [n for n in names if n not in list_margins()]
    if unknown:
        raise CommandError(f"unknown --loss {unknown[0]!r}; known: {', '.join(list_margins())}")
    # The toy's matrices are tiny: one thread avoids oversubscribing shared cores (10x faster under load).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print(f"{'loss':<22}{'accuracy':>9}{'gap deg':>9}{'loss':>9}{'seconds':>9}  png")
        for name in names:
            result = train_toy(name, steps=args.steps, dim=args.dim, seed=args.seed)
            path = plot_toy(result, Path(args.output) / f"toy_{name}.png")
            print(f"{name:<22}{result.accuracy:>9.3f}{angular_gap_degrees(result):>9.1f}{result.final_loss:>9.3f}"
                  f"{result.seconds:>9.1f}  {path}")
    finally:
        torch.set_num_threads(previous_threads)
    return 0


def _clean_subcenters(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from distrib_face.cli import CommandError
    from distrib_face.losses.subcenter import clean_subcenters

    for flag, value in (("--checkpoint", args.checkpoint), ("--weights", args.weights), ("--embeddings", args.embeddings)):
        if value is not None and not Path(value).exists():
            raise CommandError(f"{flag} {value}: no such file or folder")
    if args.checkpoint:
        from distrib_face.parallel.checkpoint import load_full_matrix

        weight = load_full_matrix(args.checkpoint)
    else:
        weight = torch.from_numpy(np.load(args.weights, allow_pickle=False))
    with np.load(args.embeddings, allow_pickle=False) as data:
        missing = {"embeddings", "labels"} - set(data.files)
        if missing:
            raise CommandError(f"{args.embeddings}: missing arrays {sorted(missing)} (has {data.files})")
        embeddings, labels = torch.from_numpy(data["embeddings"]), torch.from_numpy(data["labels"]).long()
        keys = data["keys"].astype(str) if "keys" in data.files else None
    result = clean_subcenters(weight, embeddings, labels, args.threshold)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "noisy.csv", "w") as handle:
        handle.write("index,key,label,angle_degrees\n")
        for i in result.noisy:
            key = keys[i] if keys is not None else ""
            handle.write(f"{i},{key},{int(labels[i])},{result.angles[i]:.3f}\n")
    np.savez(out / "dominant.npz", dominant=result.dominant, counts=result.counts, weight=result.weight.numpy())
    non_dominant = int(result.counts.sum() - result.counts.max(axis=1).sum())
    print(f"{len(labels)} samples, {weight.shape[0]} classes x {weight.shape[1]} sub-centres; "
          f"{non_dominant} samples nearest a non-dominant sub-centre; {len(result.noisy)} beyond "
          f"{args.threshold:g} deg -> {out / 'noisy.csv'}, {out / 'dominant.npz'}")
    return 0
