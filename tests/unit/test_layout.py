"""The architecture rules of STYLE.md that a machine can check."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distrib_face"


def _distributed_imports(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name.startswith("torch.distributed") for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("torch.distributed") or (
                module == "torch" and any(alias.name == "distributed" for alias in node.names)
            ):
                lines.append(node.lineno)
    return lines


def test_torch_distributed_only_in_parallel_package():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "parallel":
            continue
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}" for line in _distributed_imports(path)]
        if "torch.distributed." in path.read_text():
            offenders.append(f"{path.relative_to(PACKAGE.parent)}: uses torch.distributed.*")
    assert not offenders, f"torch.distributed used outside distrib_face/parallel/: {offenders}"


def test_no_cuda_calls_in_library_code():
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if ".cuda()" in p.read_text()]
    assert not offenders, f".cuda() in library code (pass a device instead): {offenders}"


def test_layout_checker_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom torch import distributed as dist\nimport torch.distributed\n")
    assert _distributed_imports(bad) == [2, 3]


def test_cli_help_lists_groups(capsys):
    from distrib_face.cli import build_parser

    text = build_parser().format_help()
    for group in ("bench", "plot", "data"):
        assert group in text
