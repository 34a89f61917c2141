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
#: models / losses. Leaf modules (atomic.py, dtypes.py, redact.py, safe_load.py) import nothing of distrib_face;
#: figures.py only the atomic writes.
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
    "safe_load": frozenset({"*"}),
    "figures": frozenset({"parallel", "train", "tracking", "cli", "data", "models", "losses", "eval", "export",
                          "config", "dtypes", "redact", "safe_load"}),
}


def _layer(path: Path, package: Path = PACKAGE) -> str:
    return path.relative_to(package).parts[0].removesuffix(".py")


def _module_name(path: Path, package: Path = PACKAGE) -> list[str]:
    """The dotted name of ``path`` as parts (``distrib_face/models/__init__.py`` -> ``distrib_face.models``)."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_modules(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of every import in ``path`` (lazy ones too).

    Relative imports are resolved against the module's own package (``from ..parallel import x`` in
    ``distrib_face/models/a.py`` is ``distrib_face.parallel.x``); a ``from M import n`` gives ``M.n``, since
    ``n`` may be a module (``from distrib_face.models import iresnet``).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    module_parts = _module_name(path, package)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # level 1 is the module's own package: the module itself for __init__.py, its parent else
                keep = len(module_parts) - node.level + (1 if is_package else 0)
                if keep < 1:
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(module_parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return out


def _package_imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, imported distrib_face layer)`` for every import of the package in ``path`` (lazy, relative too)."""
    out = []
    for line, name in _imported_modules(path, package):
        parts = name.split(".")
        if parts[0] == package.name and len(parts) > 1:
            out.append((line, parts[1]))
    return out


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """Every import that breaks :data:`FORBIDDEN`, as ``file:line: layer imports other``."""
    offenders = []
    for path in sorted(package.rglob("*.py")):
        layer = _layer(path, package)
        banned = FORBIDDEN.get(layer, frozenset())
        for line, imported in sorted(set(_package_imports(path, package))):
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


def test_layer_checker_resolves_relative_imports(tmp_path):
    package = tmp_path / "distrib_face"
    (package / "models").mkdir(parents=True)
    (package / "parallel").mkdir()
    (package / "models" / "x.py").write_text(
        "from . import layers\nfrom .. import atomic\n\ndef f():\n    from ..parallel import collectives\n"
        "from ..train.step import StepRunner\n"
    )
    (package / "parallel" / "__init__.py").write_text("from . import collectives\nfrom ..data import shards\n")
    assert layer_violations(package) == [
        "distrib_face/models/x.py:5: models imports distrib_face.parallel",
        "distrib_face/models/x.py:6: models imports distrib_face.train",
        "distrib_face/parallel/__init__.py:2: parallel imports distrib_face.data",
    ]


FAMILIES = ("iresnet", "mobilefacenet", "vit")


def family_violations(package: Path = PACKAGE) -> list[str]:
    """Imports of one model family by another (or by the registry), in any spelling: ``from
    distrib_face.models.vit import X``, ``from distrib_face.models import vit``, ``import
    distrib_face.models.vit``, ``from .vit import X``, ``from . import vit``."""
    offenders = []
    for name in (*FAMILIES, "registry"):
        path = package / "models" / f"{name}.py"
        for line, imported in _imported_modules(path, package):
            parts = imported.split(".")
            if parts[:2] == [package.name, "models"] and len(parts) > 2 and parts[2] in FAMILIES and parts[2] != name:
                offenders.append(f"models/{name}.py:{line} imports {package.name}.models.{parts[2]}")
    return offenders


def test_model_families_do_not_import_each_other():
    offenders = family_violations()
    registry = ast.parse((PACKAGE / "models" / "registry.py").read_text())
    offenders += [f"models/registry.py:{n.lineno} imports a family" for n in ast.walk(registry)
                  if isinstance(n, ast.ImportFrom) and n.module == "distrib_face.models"]
    assert not offenders, offenders


def test_family_checker_catches_every_spelling(tmp_path):
    package = tmp_path / "distrib_face"
    (package / "models").mkdir(parents=True)
    for name in ("iresnet", "vit"):
        (package / "models" / f"{name}.py").write_text("from distrib_face.models.layers import x\n")
    (package / "models" / "registry.py").write_text("import inspect\n")
    (package / "models" / "mobilefacenet.py").write_text(
        "from distrib_face.models.layers import x\nfrom distrib_face.models import iresnet\n"
        "import distrib_face.models.vit\nfrom .iresnet import IResNet\nfrom . import vit\n"
        "from distrib_face.models.vit import ViT\nfrom . import mobilefacenet\n"
    )
    assert family_violations(package) == [
        "models/mobilefacenet.py:2 imports distrib_face.models.iresnet",
        "models/mobilefacenet.py:3 imports distrib_face.models.vit",
        "models/mobilefacenet.py:4 imports distrib_face.models.iresnet",
        "models/mobilefacenet.py:5 imports distrib_face.models.vit",
        "models/mobilefacenet.py:6 imports distrib_face.models.vit",
    ]


#: Files that may rename, and why. Everything else publishes through distrib_face.atomic (atomic_open /
#: atomic_path / atomic_dir, or publish_file / publish_dir for a temp file or folder it finished itself), so
#: that every rename is preceded by an fsync and followed by one of the folder.
RENAME_ALLOWED: dict[str, str] = {
    "distrib_face/atomic.py": "the one place that renames a finished temp file or folder into place",
}


def rename_calls(path: Path) -> list[int]:
    """Lines in ``path`` that rename a file: ``os.replace`` / ``os.rename`` / ``os.renames`` / ``shutil.move``
    (also imported by name), ``Path.replace`` / ``Path.rename``, and ``<path>.replace(target)`` /
    ``<path>.rename(target)``: a ``.replace`` / ``.rename`` method called with one positional argument and no
    keywords (``str.replace`` takes two, ``dataclasses.replace`` is named, ``datetime.replace`` takes keywords).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    banned = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}
    bare = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names if (node.module, alias.name) in banned}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in bare:
            lines.append(node.lineno)
        elif isinstance(func, ast.Attribute) and func.attr in {"replace", "rename", "renames", "move"}:
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if (owner, func.attr) in banned or owner in {"Path", "PosixPath", "pathlib"}:
                lines.append(node.lineno)
            elif (owner != "dataclasses" and func.attr in {"replace", "rename"} and len(node.args) == 1
                  and not node.keywords):
                lines.append(node.lineno)
    return sorted(lines)


def test_renames_only_in_atomic():
    root = PACKAGE.parent
    offenders = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(root / "launch").glob("*.py")]):
        name = str(path.relative_to(root))
        if name not in RENAME_ALLOWED:
            offenders += [f"{name}:{line}" for line in rename_calls(path)]
    assert not offenders, ("a rename outside distrib_face/atomic.py (use publish_file / publish_dir or the atomic "
                           f"context managers, or add the file to RENAME_ALLOWED with a reason): {offenders}")


def test_rename_checker_catches_every_spelling(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "import os, shutil, dataclasses\nfrom os import replace as swap\nfrom pathlib import Path\n"
        "os.replace('a', 'b')\nos.rename('a', 'b')\nPath('a').rename('b')\ntmp.replace(final)\n"
        "swap('a', 'b')\nPath.replace(Path('a'), 'b')\nshutil.move('a', 'b')\n"
        "'a_b'.replace('_', '-')\ndataclasses.replace(cfg)\ndataclasses.replace(cfg, x=1)\n"
        "when.replace(year=1)\nname.replace('@', '_')\n"
    )
    assert rename_calls(source) == [4, 5, 6, 7, 8, 9, 10]


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
