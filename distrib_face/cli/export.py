"""Subcommands of ``distrib_face.export``: ``distrib-face export``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``distrib-face export``."""
    parser = sub.add_parser(
        "export",
        help="export a trained backbone to ONNX or TorchScript and check it against PyTorch",
        description=(
            "Export a backbone (a file from save_backbone, or a checkpoint directory holding backbone.pt) to "
            "ONNX (dynamic batch; input 'input' N x 3 x 112 x 112 RGB normalised as (x - 127.5) / 127.5; "
            "output 'embedding' N x 512) or TorchScript, then compare the export with PyTorch."
        ),
    )
    parser.add_argument("--checkpoint", required=True,
                        help="backbone file, checkpoint directory with backbone.pt, or a folder whose 'latest' names one")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--output", required=True, help="output file (.onnx or .pt)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.add_argument(
        "--parity-images",
        default=None,
        help="folder of face images (all one size) for the parity check; default: 16 random smooth images",
    )
    parser.add_argument("--parity-limit", type=int, default=64, help="at most this many parity images")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="fail (exit 1) when the parity difference exceeds this"
    )
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from distrib_face.export.exporter import (
        DEFAULT_OPSET,
        export_onnx,
        export_torchscript,
        insightface_routes,
        load_for_export,
    )
    from distrib_face.export.parity import (
        check_parity,
        check_torchscript_parity,
        load_image_folder,
        random_face_like_images,
    )

    from distrib_face.cli import report_error

    model, info = load_for_export(args.checkpoint)  # a missing / wrong --checkpoint: one line, exit 2
    size = info["input_size"]
    if args.format == "onnx":
        opset = args.opset or DEFAULT_OPSET
        metadata = {"backbone": info["name"], "source": info["source"]}
        out = export_onnx(model, args.output, opset=opset, metadata=metadata)
    else:
        if args.opset is not None:
            print("note: --opset applies to ONNX only; ignored")
        out = export_torchscript(model, args.output)
    if args.parity_images:
        images = load_image_folder(args.parity_images, limit=args.parity_limit)
        what = f"{len(images)} images from {args.parity_images}"
    else:
        images = random_face_like_images(16, size)
        what = "16 random smooth images"
    check = check_parity if args.format == "onnx" else check_torchscript_parity
    diff = check(model, out, images)
    print(f"backbone   {info['name']} {info['kwargs']} (from {info['source']})")
    print(f"exported   {args.format} -> {out}  (input {size}x{size}, dynamic batch)")
    if args.format == "onnx" and not insightface_routes(size):
        print(f"note       insightface's model zoo will not load a {size}x{size} model as a recognition model "
              "(it routes square inputs >= 112 px, divisible by 16, other than 192)")
    print(f"parity     max |{args.format} - torch| = {diff:.3g} on {what} (tolerance {args.tolerance:g})")
    if diff > args.tolerance:
        report_error(f"parity check failed: max |{args.format} - torch| = {diff:.3g} > --tolerance {args.tolerance:g}")
        return 1
    return 0
