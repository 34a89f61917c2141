"""Subcommands of ``distrib_face.eval``: ``eval`` and ``pack-pairs``."""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face eval`` and ``distrib-face pack-pairs``."""
    p = sub.add_parser(
        "eval",
        help="verification metrics of a model on pair sets (and IJB templates)",
        description="Embed each pair set with the model and print accuracy (10-fold), TAR@FAR, AUC and EER.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="an .onnx file, a backbone file (save_backbone) or a checkpoint folder with backbone.pt",
    )
    p.add_argument(
        "--pairs",
        action="append",
        default=[],
        metavar="P",
        help="a pair-set .npz (pack-pairs), an insightface .bin, a pairs.txt or a folder with pairs.txt; repeatable",
    )
    p.add_argument("--images", default=None, help="image folder for a pairs.txt in --pairs (default: its folder)")
    p.add_argument("--ijb", default=None, metavar="ROOT", help="IJB root with meta/ and loose_crop/ (templates)")
    p.add_argument("--ijb-target", default="ijbc", help="IJB file prefix: ijbc or ijbb (default ijbc)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--device", default="cpu", help="torch device for a backbone (ONNX runs on the CPU provider)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--nfolds", type=int, default=10, help="folds of the accuracy protocol when a set has none")
    p.add_argument("--roc", default=None, metavar="PNG", help="write all ROC curves into this PNG (log-scale FAR)")
    p.add_argument(
        "--class-counts",
        default=None,
        metavar="PATH",
        help="training images per identity (JSON {name: count}, or the training shard folder / manifest.json): "
        "splits each pair set with per-image identities into head / torso / tail / unseen buckets",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write results as JSON (to PATH, or stdout instead of the table)",
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "pack-pairs",
        help="write a verification set (.bin or pairs.txt + images) as one pair-set file",
        description="Read an insightface .bin (restricted unpickler) or an LFW-style pairs.txt with its image folder "
        "and write one pair-set .npz that the trainer and `distrib-face eval` read.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bin", default=None, help="an insightface verification .bin (lfw.bin, cfp_fp.bin, ...)")
    source.add_argument("--pairs", default=None, help="an LFW-style pairs.txt")
    p.add_argument("--images", default=None, help="image folder for --pairs (default: the folder of pairs.txt)")
    p.add_argument("--output", required=True, help="the pair-set file to write (.npz)")
    p.add_argument("--name", default=None, help="the set's name (default: the .bin stem or the image folder name)")
    p.set_defaults(func=_pack_pairs)

    p = groups["bench"].add_parser(
        "eval",
        help="time the verification metrics at IJB-C scale (and embedding img/s with --model)",
        description="Times tar_at_far, roc_curve and all verification metrics on synthetic scores "
        "(default: IJB-C's 15,658,489 template pairs, 19,557 genuine); with --model, embedding throughput.",
    )
    p.add_argument("--num-pairs", type=int, default=15_658_489)
    p.add_argument("--num-genuine", type=int, default=19_557)
    p.add_argument("--model", default=None, help="also time embed_images with this model (see `eval --model`)")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_bench)


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def format_table(results: list[Any]) -> str:
    """The results as a fixed-width text table (percentages), followed by the notes of each set."""
    if not results:
        return "(no results)"
    fars = list(results[0].tar_at_far)
    header = ["set", "pairs", "acc % (± std)", *[f"TAR@{far:.0e}" for far in fars], "AUC %", "EER %", "|f| mean±std"]
    rows = []
    for r in results:
        norm = f"{r.norm_stats['mean']:.2f}±{r.norm_stats['std']:.2f}" if r.norm_stats else "-"
        rows.append(
            [
                r.name,
                str(r.num_pairs),
                f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}",
                *[_fmt_pct(r.tar_at_far.get(far)) for far in fars],
                _fmt_pct(r.auc),
                _fmt_pct(r.eer),
                norm,
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        lines += [f"note ({r.name}): {note}" for note in r.notes]
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from distrib_face.eval.buckets import evaluate_pairset_by_class_size, format_class_size_table, load_class_counts
    from distrib_face.eval.embed import load_model
    from distrib_face.eval.ijb import embed_ijb, evaluate_templates, read_ijb_protocol
    from distrib_face.eval.plots import plot_roc
    from distrib_face.eval.readers import load_any_pairs

    from distrib_face.cli import CommandError, one_line

    if not args.pairs and not args.ijb:
        raise CommandError("eval: give at least one --pairs or --ijb")
    try:
        model = load_model(args.model, device=args.device, num_threads=args.threads)
    except (OSError, ValueError) as err:
        raise CommandError(f"--model: {one_line(err)}") from err
    try:
        pairsets = [load_any_pairs(p, images_dir=args.images) for p in args.pairs]
        protocol = read_ijb_protocol(args.ijb, args.ijb_target) if args.ijb else None
        class_counts, edges = load_class_counts(args.class_counts) if args.class_counts else (None, None)
        if class_counts is not None and not any(p.identities is not None for p in pairsets):
            raise ValueError(f"--class-counts {args.class_counts}: no --pairs set has per-image identity names")
    except (OSError, ValueError) as err:
        raise CommandError(f"--pairs: {one_line(err)}" if args.pairs else one_line(err)) from err
    results, by_size = [], []
    for pairset in pairsets:
        logger.info("evaluating %s: %d pairs", pairset.name, pairset.num_pairs)
        result, sizes = evaluate_pairset_by_class_size(
            model, pairset, class_counts if pairset.identities is not None else None, edges=edges or (10, 100),
            batch_size=args.batch_size, flip=not args.no_flip, nfolds=args.nfolds,
        )
        results.append(result)
        by_size.append(sizes)
    if protocol is not None:
        features = embed_ijb(model, protocol, batch_size=args.batch_size, flip=not args.no_flip)
        results.append(evaluate_templates(features, protocol))
    # two sets with one name (e.g. two pairs.txt in folders of the same name) keep separate curves
    names: dict[str, int] = {}
    for r in results:
        names[r.name] = names.get(r.name, 0) + 1
        if names[r.name] > 1:
            r.name = f"{r.name}#{names[r.name]}"
    if args.roc:
        plot_roc({r.name: r for r in results}, args.roc, title=f"ROC: {args.model}")
    payload = {"model": str(args.model), "flip": not args.no_flip, "results": [r.to_dict() for r in results]}
    for entry, sizes in zip(payload["results"], by_size):
        if sizes is not None:
            entry["class_size"] = sizes.to_dict()
    if args.json == "-":
        print(json.dumps(payload, indent=2))
    else:
        print(format_table(results))
        for sizes in by_size:
            if sizes is not None:
                print(format_class_size_table(sizes))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=2)
    return 0


def _pack_pairs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distrib_face.data.pairset import save_pairset
    from distrib_face.eval.readers import read_bin, read_lfw_pairs

    from distrib_face.cli import CommandError, one_line

    try:
        if args.bin:
            pairs = read_bin(args.bin, name=args.name)
        else:
            images = Path(args.images) if args.images else Path(args.pairs).parent
            pairs = read_lfw_pairs(args.pairs, images, name=args.name)
    except (OSError, ValueError) as err:
        raise CommandError(one_line(err)) from err
    path = save_pairset(args.output, pairs)
    folds = "none" if pairs.folds is None else str(len(set(pairs.folds.tolist())))
    print(
        f"wrote {path}: {pairs.name!r}, {pairs.num_pairs} pairs ({int(pairs.issame.sum())} same), "
        f"{len(pairs.images)} images, folds: {folds}"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from distrib_face.eval.metrics import roc_curve, tar_at_far, verification_metrics_from_scores

    from distrib_face.cli import CommandError

    if not 0 < args.num_genuine < args.num_pairs:
        raise CommandError(f"bench eval: need 0 < --num-genuine < --num-pairs, got {args.num_genuine}")
    rng = np.random.default_rng(0)
    issame = np.zeros(args.num_pairs, dtype=bool)
    issame[rng.choice(args.num_pairs, args.num_genuine, replace=False)] = True
    scores = rng.normal(issame * 3.0, 1.0)
    rows = []
    for name, fn in (
        ("tar_at_far", lambda: tar_at_far(scores, issame)),
        ("roc_curve", lambda: roc_curve(scores, issame)),
        (
            "verification_metrics_from_scores (10-fold, ROC, TAR, AUC, EER)",
            lambda: verification_metrics_from_scores(scores, issame),
        ),
    ):
        start = time.perf_counter()
        fn()
        rows.append((f"{name}, {args.num_pairs:,} pairs", f"{time.perf_counter() - start:.1f} s"))
    if args.model:
        from distrib_face.eval.embed import embed_images, load_model

        model = load_model(args.model, device=args.device)
        images = rng.integers(0, 256, (args.num_images, *getattr(model, "input_size", (112, 112)), 3), dtype=np.uint8)
        embed_images(model, images[: args.batch_size], batch_size=args.batch_size)  # warm-up
        for flip in (False, True):
            start = time.perf_counter()
            embed_images(model, images, batch_size=args.batch_size, flip=flip)
            rate = args.num_images / (time.perf_counter() - start)
            rows.append((f"embed_images {args.model} flip={flip} batch={args.batch_size}", f"{rate:.1f} img/s"))
    width = max(len(r[0]) for r in rows)
    print(f"| {'what'.ljust(width)} | result |")
    print(f"|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    return 0
