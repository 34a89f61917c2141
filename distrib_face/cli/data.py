"""Subcommands of ``distrib_face.data``: ``pack``, ``synth``, ``data stats``, ``data verify``, ``bench data``,
``bench manifest``.

Exit codes of ``pack``: 0 everything packed; 3 packed, but images were skipped or identities were empty
(listed in ``pack_report.json``); 2 nothing usable written (refused output, strict stop, bad input).

Exit codes of ``data verify``: 0 no problem; 3 problems found (the table lists them by shard and reason);
2 the shard set cannot be checked (no manifest, an invalid one: the message names the field).
"""

from __future__ import annotations

import argparse
import logging
import os

from distrib_face.data.decode import DEFAULT_MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

EXIT_SKIPPED = 3
EXIT_PROBLEMS = 3


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``pack``, ``synth``, ``data stats``, ``data verify``, ``bench data`` and ``bench manifest``."""
    p = sub.add_parser("pack", help="pack an image folder / insightface .rec / list file into webdataset shards")
    p.add_argument("source", help="identity-per-folder tree, train.rec (or its folder), or a 'path label' list")
    p.add_argument("out", help="output folder for NAME-%%06d.tar shards, manifest.json, pack_report.json")
    p.add_argument("--kind", default="auto", choices=["auto", "folder", "recordio", "list"])
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--max-count", type=int, default=10000, help="most samples per shard")
    p.add_argument("--max-mb", type=float, default=512.0, help="most image megabytes per shard")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    p.add_argument("--image-size", type=int, default=None, help="resize every image to this square size")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--if-exists", default="refuse", choices=["refuse", "resume", "overwrite"],
                   help="what to do when the output folder already holds shards")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    p.add_argument("--no-verify", action="store_true", help="pass JPEGs through without a test decode")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="skip images whose header claims more pixels (decompression bombs) before decoding")
    p.set_defaults(func=_pack)

    s = sub.add_parser("synth", help="write a synthetic long-tailed face-like identity set as shards")
    s.add_argument("out", help="output folder")
    s.add_argument("--identities", type=int, default=200, help="training identities")
    s.add_argument("--min-images", type=int, default=4)
    s.add_argument("--max-images", type=int, default=60)
    s.add_argument("--zipf-a", type=float, default=1.5, help="Zipf exponent of images per identity")
    s.add_argument("--holdout", type=int, default=50, help="held-out identities (in holdout_pairs.npz only)")
    s.add_argument("--pairs", type=int, default=600, help="held-out verification pairs")
    s.add_argument("--seen-pairs", type=int, default=0,
                   help="pairs of training identities (new renders, with training counts) in seen_pairs.npz")
    s.add_argument("--image-size", type=int, default=112)
    s.add_argument("--samples-per-shard", type=int, default=500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None,
                   help="processes rendering shards (default: CPU count); the output does not depend on it")
    s.set_defaults(func=_synth)

    st = groups["data"].add_parser("stats", help="images-per-identity histogram of a shard set (text + PNG)")
    st.add_argument("shards", help="shard folder, manifest.json, or their URL")
    st.add_argument("--png", default=None, help="figure path (default: images_per_identity.png beside the "
                    "manifest, or in the current folder for a URL)")
    st.set_defaults(func=_stats)

    v = groups["data"].add_parser("verify", help="read every sample once and list problems by shard and reason")
    v.add_argument("shards", help="shard folder, manifest.json, or their URL")
    v.add_argument("--workers", type=int, default=2, help="processes, one shard at a time each (default 2)")
    v.add_argument("--sha256", action="store_true", help="also check each shard's SHA-256 against the manifest")
    v.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="pixel limit of image headers (data.max_image_pixels)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_verify)

    b = groups["bench"].add_parser("data", help="loader img/s: DALI CPU 1 / 2 threads, DALI mixed on a GPU, PIL")
    b.add_argument("--shards", default=None, help="shard folder (default: synthetic shards in a temp folder)")
    b.add_argument("--identities", type=int, default=500, help="synthetic identities when --shards is not given")
    b.add_argument("--image-size", type=int, default=112)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--batches", type=int, default=30, help="timed batches per configuration")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--workers", type=int, default=2, help="reader processes")
    b.add_argument("--device", default="cpu", help="cuda[:N] adds the DALI mixed (GPU) row")
    b.set_defaults(func=_bench)

    m = groups["bench"].add_parser("manifest", help="seconds and RSS of reading a shard manifest, format 1 vs 2")
    m.add_argument("--classes", type=int, default=1_000_000, help="identities in the manifest (default 1,000,000)")
    m.set_defaults(func=_bench_manifest)


def _pack(args: argparse.Namespace) -> int:
    from distrib_face.data.pack import PackError, pack

    try:
        result = pack(args.source, args.out, kind=args.kind, prefix=args.prefix, max_count=args.max_count,
                      max_mb=args.max_mb, quality=args.quality, image_size=args.image_size, workers=args.workers,
                      if_exists=args.if_exists, strict=args.strict, verify=not args.no_verify,
                      progress=not args.no_progress, max_image_pixels=args.max_image_pixels)
    except PackError as err:
        from distrib_face.cli import CommandError

        raise CommandError(str(err)) from err
    m = result.manifest
    print(f"packed {m.num_samples} images of {m.num_classes} identities into {len(m.shards)} shards in {args.out}")
    if result.num_skipped or result.empty_identities:
        print(f"skipped {result.num_skipped} unreadable images, {len(result.empty_identities)} empty identities: "
              f"see {result.report_path}")
        return EXIT_SKIPPED
    return 0


def _check_not_other_file(shards: str) -> None:
    """Refuse a local file that cannot be a shard manifest (a .tar, a pair set) before reading it as JSON."""
    from pathlib import Path

    from distrib_face.cli import CommandError
    from distrib_face.data.manifest import is_remote

    given = Path(shards)
    if not is_remote(shards) and given.is_file() and given.suffix != ".json":
        raise CommandError(f"{given}: a {given.suffix or 'plain'} file, not a shard folder or its manifest.json")


def _verify(args: argparse.Namespace) -> int:
    from distrib_face.cli import CommandError, one_line
    from distrib_face.data.verify import verify_shards

    _check_not_other_file(args.shards)
    try:
        result = verify_shards(args.shards, workers=args.workers, sha256=args.sha256,
                               max_image_pixels=args.max_image_pixels, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:  # no manifest, or an invalid one (the message names it)
        raise CommandError(one_line(err)) from err
    print(result.table())
    return 0 if result.ok else EXIT_PROBLEMS


def _synth(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distrib_face.cli import CommandError, one_line
    from distrib_face.data.synthetic import write_synthetic

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"{args.out}: exists and is not a folder (synth writes a shard folder)")
    try:
        m = write_synthetic(args.out, num_identities=args.identities, min_images=args.min_images,
                            max_images=args.max_images, zipf_a=args.zipf_a, holdout_identities=args.holdout,
                            image_size=args.image_size, seed=args.seed, num_pairs=args.pairs,
                            samples_per_shard=args.samples_per_shard, seen_pairs=args.seen_pairs,
                            workers=args.workers or os.cpu_count() or 1)
    except ValueError as err:  # a count out of range (the message names the parameter and the value)
        raise CommandError(one_line(err)) from err
    print(f"wrote {m.num_samples} images of {m.num_classes} identities in {len(m.shards)} shards to {args.out}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distrib_face.cli import CommandError
    from distrib_face.data.manifest import is_remote, read_manifest
    from distrib_face.data.stats import format_histogram, plot_class_sizes

    _check_not_other_file(args.shards)
    try:
        m = read_manifest(args.shards)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err
    print(format_histogram(m.class_counts))
    png = args.png
    if png is None:
        location = m.location or args.shards
        png = "images_per_identity.png" if is_remote(location) else str(Path(location).parent /
                                                                          "images_per_identity.png")
    print(f"figure: {plot_class_sizes(m.class_counts, png, title=str(args.shards))}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import tempfile

    from distrib_face.data.bench import default_configs, measure

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shards = args.shards
        if shards is None:
            from distrib_face.data.synthetic import write_synthetic

            write_synthetic(tmp, num_identities=args.identities, min_images=4, max_images=40,
                            holdout_identities=0, image_size=args.image_size, samples_per_shard=500)
            shards = tmp
        print(f"shards: {shards}; batch {args.batch_size}; {args.batches} timed batches after {args.warmup}")
        print(f"{'configuration':<24} {'decoder':>7} {'device':>7} {'threads':>7} {'workers':>7} {'img/s':>9}")
        for config in default_configs(args.device, args.workers):
            row = measure(shards, batch_size=args.batch_size, batches=args.batches, warmup=args.warmup, **config)
            print(f"{row.name:<24} {row.decoder:>7} {row.device:>7} {row.dali_threads:>7} {row.num_workers:>7} "
                  f"{row.images_per_second:>9.0f}")
    return 0


def _bench_manifest(args: argparse.Namespace) -> int:
    from distrib_face.data.manifest_bench import format_manifest_table, measure_manifest_cost

    if args.classes < 1:
        from distrib_face.cli import CommandError

        raise CommandError(f"--classes must be >= 1, got {args.classes}")
    print(format_manifest_table(args.classes, measure_manifest_cost(args.classes)))
    return 0
