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


#: What each layer of distrib_face may not import (docs/architecture in README "Layout"; issue 12). The
#: order of the layers, top to bottom: cli -> train -> tracking -> parallel / eval / export / config -> data /
#: models / losses. Leaf modules (atomic.py, dtypes.py, redact.py) import nothing of distrib_face.
FORBIDDEN: dict[str, frozenset[str]] = {
    "models": frozenset({"parallel", "train", "tracking", "cli", "data", "losses", "eval", "export", "config"}),
    "losses": frozenset({"parallel", "train", "tracking", "cli", "models", "eval", "export", "data"}),
    "data": frozenset({"parallel", "train", "tracking", "cli", "eval", "export"}),
    "eval": frozenset({"parallel", "train", "cli"}),
    "export": frozenset({"parallel", "train", "cli", "tracking"}),
    "tracking": frozenset({"parallel", "train", "cli"}),
    "parallel": frozenset({"train", "tracking", "data", "eval", "export", "cli"}),
    "config": frozenset({"parallel", "train", "tracking", "cli", "eval", "export"}),
    "train": frozenset({"cli"}),
    "atomic": frozenset({"*"}),
    "dtypes": frozenset({"*"}),
    "redact": frozenset({"*"}),
}


def _layer(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).parts[0].removesuffix(".py")


def _package_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported distrib_face layer)`` for every import of the package in ``path`` (lazy ones too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "distrib_face":
                names = [f"distrib_face.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "distrib_face" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """Every import that breaks :data:`FORBIDDEN`, as ``file:line: layer imports other``."""
    offenders = []
    for path in sorted(package.rglob("*.py")):
        layer = _layer(path, package)
        banned = FORBIDDEN.get(layer, frozenset())
        for line, imported in sorted(_package_imports(path)):
            if imported != layer and ("*" in banned or imported in banned):
                offenders.append(f"{path.relative_to(package.parent)}:{line}: {layer} imports distrib_face.{imported}")
    return offenders


def test_layers_hold():
    offenders = layer_violations()
    assert not offenders, "layer rules broken (see FORBIDDEN in tests/unit/test_layout.py):\n" + "\n".join(offenders)


def test_layer_checker_names_file_and_line(tmp_path):
    package = tmp_path / "distrib_face"
    (package / "models").mkdir(parents=True)
    (package / "models" / "x.py").write_text(
        "import os\n\ndef f():\n    from distrib_face.parallel.collectives import all_reduce_tensor\n"
        "from distrib_face import train\nfrom distrib_face.models import layers\n"
    )
    assert layer_violations(package) == [
        "distrib_face/models/x.py:4: models imports distrib_face.parallel",
        "distrib_face/models/x.py:5: models imports distrib_face.train",
    ]


def test_model_families_do_not_import_each_other():
    families = ("iresnet", "mobilefacenet", "vit")
    offenders = []
    for family in families:
        tree = ast.parse((PACKAGE / "models" / f"{family}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in {f"distrib_face.models.{f}" for f in families}:
                offenders.append(f"models/{family}.py:{node.lineno} imports {node.module}")
    registry = ast.parse((PACKAGE / "models" / "registry.py").read_text())
    offenders += [f"models/registry.py:{n.lineno} imports a family" for n in ast.walk(registry)
                  if isinstance(n, ast.ImportFrom) and n.module == "distrib_face.models"]
    assert not offenders, offenders


def test_no_function_over_120_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 120:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over 120 lines: {long}"


def test_layout_checker_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom torch import distributed as dist\nimport torch.distributed\n")
    assert _distributed_imports(bad) == [2, 3]


def test_cli_help_lists_groups(capsys):
    from distrib_face.cli import build_parser

    text = build_parser().format_help()
    for group in ("bench", "plot", "data"):
        assert group in text
