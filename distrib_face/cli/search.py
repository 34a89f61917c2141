"""Subcommands ``embed``, ``search`` and ``bench search`` (``distrib_face.eval``: embedding files, 1:N search)."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face embed``, ``distrib-face search`` and ``distrib-face bench search``."""
    p = sub.add_parser(
        "embed",
        help="embed a shard folder, an image folder or a list file into an embedding .npz",
        description="Embed every image of SOURCE with MODEL (flip-averaged, unit norm, exactly as `eval` embeds) "
        "and write embeddings, labels (-1 unknown), names and identities to OUT.npz. Unreadable images are "
        "skipped and counted by reason.",
    )
    p.add_argument("source", help="a shard folder (manifest.json), an image folder (per identity or flat) or a "
                   "'path label' list file")
    p.add_argument("--model", required=True,
                   help="an .onnx file, a backbone file (save_backbone) or a checkpoint folder with backbone.pt")
    p.add_argument("--output", required=True, help="the embedding file to write (.npz)")
    p.add_argument("--kind", default="auto", choices=["auto", "shards", "folder", "flat", "list"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="image reader processes (default: CPU count - 1; 0 decodes in this process)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--device", default="cpu", help="torch device for a backbone (ONNX runs on the CPU provider)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one reader task may take")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "search",
        help="1:N identification of probe embeddings against a gallery (faiss): CMC, rank-k, open-set TPIR",
        description="Search each probe in the gallery (+ distractors) and report rank-1, rank-k and the CMC over "
        "mated probes, and TPIR at FPIR when some probes' identities are not in the gallery.",
    )
    p.add_argument("--gallery", required=True, help="embedding file (distrib-face embed) of the enrolled images")
    p.add_argument("--probes", required=True, help="embedding file of the probes")
    p.add_argument("--distractors", default=None, help="embedding file of distractors (no probe's identity)")
    p.add_argument("--top-k", type=int, default=10, help="identities returned per probe (CMC length)")
    p.add_argument("--output", default=None, help="write the report (JSON) here")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                   help="auto: exact (flat) below 1M entries, IVF above")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF cells searched (default 64)")
    p.add_argument("--hnsw-m", type=int, default=None, help="HNSW links per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=None, help="HNSW build candidate list (default 80)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search candidate list (default 128)")
    p.add_argument("--gpu", default="auto", choices=["auto", "on", "off"],
                   help="use a faiss GPU build when installed (auto), require it (on), or not (off)")
    p.add_argument("--fpir", type=float, action="append", default=None, metavar="F",
                   help="FPIR targets of the open-set TPIR (repeatable; default 1e-1 and 1e-2)")
    p.add_argument("--open-set-rank", type=int, default=1, help="rank R of TPIR(T, R) (default 1)")
    p.add_argument("--cmc", default=None, metavar="PNG", help="draw the CMC curve into this PNG")
    p.add_argument("--summary-only", action="store_true", help="leave the per-probe candidates out of the report")
    p.set_defaults(func=_search)

    p = groups["bench"].add_parser(
        "search",
        help="faiss flat / IVF / HNSW: build and search time, recall against exact search",
        description="Synthetic unit vectors with planted mates (see distrib_face/eval/search_bench.py); prints a "
        "markdown table.",
    )
    p.add_argument("--distractors", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--gallery", type=int, default=1000, help="enrolled identities (one vector each)")
    p.add_argument("--mated", type=int, default=1000, help="mated probes")
    p.add_argument("--non-mated", type=int, default=1000, help="non-mated probes")
    p.add_argument("--decay", type=float, default=1.0, help="variance fall-off over dimensions (0: isotropic)")
    p.add_argument("--mate-cos", type=float, default=0.6, help="mean cosine of a probe with its mate")
    p.add_argument("--kinds", default="flat,ivf,hnsw", help="comma-separated index kinds")
    p.add_argument("--nprobe", default="16,64,256", help="IVF nprobe values to time")
    p.add_argument("--ef-search", default="64,128,256", help="HNSW efSearch values to time")
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--gpu", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_bench)


def _fail(err: Exception) -> Exception:
    """``err`` (a wrong input of ``embed``, ``search`` or ``bench search``) as the CLI's one error line: main
    prints it as ``distrib-face: error: ...`` and exits 2, like every other subcommand."""
    from distrib_face.cli import CommandError, one_line

    return CommandError(one_line(err))


def _embed(args: argparse.Namespace) -> int:
    import os

    from distrib_face.eval.embed import load_model
    from distrib_face.eval.embedset import embed_source, save_embeddings
    from distrib_face.eval.sources import SourceError, scan_image_source

    workers = args.workers if args.workers is not None else max(0, (os.cpu_count() or 1) - 1)
    try:
        model = load_model(args.model, device=args.device, num_threads=args.threads)
        source = scan_image_source(args.source, args.kind)
    except (OSError, ValueError, SourceError) as err:
        raise _fail(err) from err
    logger.info("embedding %d images of %s (%s) with %s, %d reader processes", source.num_images, source.path,
                source.kind, args.model, workers)
    try:
        emb = embed_source(model, source, batch_size=args.batch_size, workers=workers, flip=not args.no_flip,
                           timeout=args.timeout, progress=False if args.no_progress else None)
    except ValueError as err:
        raise _fail(err) from err
    emb.meta["model"] = str(args.model)
    path = save_embeddings(args.output, emb)
    skipped = ", ".join(f"{reason} {count}" for reason, count in emb.skip_counts.items()) or "none"
    print(f"wrote {path}: {len(emb)} embeddings of dim {emb.embeddings.shape[1]} from {source.kind} {source.path} "
          f"({emb.meta['images_per_sec']:.1f} img/s); skipped {len(emb.skipped_names)}: {skipped}",
          file=sys.stderr)
    return 0


def _search(args: argparse.Namespace) -> int:
    from distrib_face.eval.embedset import load_embeddings
    from distrib_face.eval.search import DEFAULT_FPIR_TARGETS, search_embeddings

    try:
        gallery = load_embeddings(args.gallery)
        probes = load_embeddings(args.probes)
        distractors = load_embeddings(args.distractors) if args.distractors else None
    except (OSError, ValueError) as err:
        raise _fail(err) from err
    options = {"kind": args.index, "gpu": args.gpu}
    for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    try:
        result, report = search_embeddings(
            gallery, probes, distractors, top_k=args.top_k, fpir_targets=tuple(args.fpir or DEFAULT_FPIR_TARGETS),
            open_set_rank=args.open_set_rank, per_probe=not args.summary_only, **options,
        )
    except ValueError as err:
        raise _fail(err) from err
    report = {"gallery": args.gallery, "probes": args.probes, "distractors": args.distractors, **report}
    if args.output:
        from distrib_face.atomic import write_json

        write_json(args.output, report)
    if args.cmc:
        from distrib_face.eval.metrics import IdentificationResult
        from distrib_face.eval.plots import plot_cmc

        if result.num_mated:
            cmc = IdentificationResult(cmc=result.cmc, rank1=result.rank1,
                                       rank5=float(result.cmc[min(4, len(result.cmc) - 1)]),
                                       num_probes=result.num_mated,
                                       num_skipped=result.num_non_mated + result.num_unknown)
            plot_cmc({args.probes: cmc}, args.cmc, max_rank=args.top_k)
        else:
            logger.warning("no mated probe: no CMC curve to draw (%s not written)", args.cmc)
    print(format_summary(report))
    return 0


def format_summary(report: dict) -> str:
    """A few lines a person reads: the sizes, the index, rank-1 / rank-k and the open-set numbers."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    index, k = report["index"], report["top_k"]
    lines = [
        f"gallery {report['num_gallery_images']} images of {report['num_gallery_identities']} identities"
        f" + {report['num_distractors']} distractors; {report['num_probes']} probes: {report['num_mated']} mated, "
        f"{report['num_non_mated']} non-mated, {report['num_unknown']} of unknown identity (matched on "
        f"{report['match_on']})",
        f"index {index['kind']}{' (GPU)' if index['on_gpu'] else ''} over {index['entries']} entries: built in "
        f"{index['build_seconds']:.2f} s, searched in {index['search_seconds']:.2f} s",
        f"rank-1 {pct(report['rank1'])}  rank-{k} {pct(report['rank' + str(k)])}",
    ]
    open_set = report.get("open_set")
    if open_set:
        tpir = "  ".join(f"TPIR@FPIR={f} {pct(v)}" for f, v in open_set["tpir_at_fpir"].items())
        lines.append(f"open set (rank {open_set['rank']}): {tpir}")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> int:
    from distrib_face.eval.search_bench import format_rows, run_search_bench, synthetic_search_set

    try:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        nprobes = [int(v) for v in args.nprobe.split(",")]
        ef_searches = [int(v) for v in args.ef_search.split(",")]
        data = synthetic_search_set(args.distractors, args.dim, args.gallery, args.mated, args.non_mated,
                                    decay=args.decay, mate_cos=args.mate_cos, seed=args.seed)
        options = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "gpu": args.gpu}
        if args.nlist:
            options["nlist"] = args.nlist
        rows = run_search_bench(data, kinds, nprobes=nprobes, ef_searches=ef_searches, **options)
    except ValueError as err:
        raise _fail(err) from err
    print(f"{args.distractors:,} distractors + {args.gallery:,} enrolled x {args.dim}-d (decay {args.decay}, "
          f"mate cos {args.mate_cos}); {args.mated:,} mated + {args.non_mated:,} non-mated probes, top-10")
    print(format_rows(rows))
    if args.json:
        from distrib_face.atomic import write_json

        write_json(args.json, rows)
    return 0
