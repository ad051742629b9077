"""Package boundaries, read from the source with `ast` (every import, inside functions too).

1. No module imports a leading-underscore name from another module: what two modules
   share is public, in the module it belongs to.
2. A branch package (concepts, kv_sidecar, sparse_autoencoder, steering_vectors,
   guided_lm) imports no other branch package, except that branch's `layout` module (how
   its artifacts are read); the shared packages (common, inputs) import no branch package
   at all.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("pipeline", "tests", "bench")
BRANCHES = ("concepts", "kv_sidecar", "sparse_autoencoder", "steering_vectors", "guided_lm")
SHARED = ("common", "inputs")
LAYOUT = "layout"


def imported(tree: ast.AST) -> Iterator[tuple[int, str, str | None]]:
    """(line, module, name) per imported name; name is None for `import module`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"line {node.lineno}: relative import; the project uses absolute")
            for alias in node.names:
                yield node.lineno, node.module or "", alias.name


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_imports(where: str, tree: ast.AST) -> list[str]:
    found = []
    for line, module, name in imported(tree):
        parts = [*module.split("."), *([name] if name else [])]
        private = [part for part in parts if is_private(part)]
        if private:
            what = f"from {module} import {name}" if name else f"import {module}"
            found.append(f"{where}:{line}: `{what}` reaches the private name {private[0]!r}")
    return found


def branch_of(where: str) -> str | None:
    """The package under pipeline/ that file `where` (relative to the root) belongs to."""
    parts = Path(where).parts
    return parts[1] if len(parts) > 2 and parts[0] == "pipeline" else None


def target(module: str, name: str | None) -> tuple[str, str | None] | None:
    """(branch, module inside it or None for the package itself) an import reaches, if any."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2 or parts[1] not in BRANCHES:
        return None
    inner = parts[2] if len(parts) > 2 else name  # `from pipeline.concepts import layout`
    return parts[1], inner


def branch_imports(where: str, tree: ast.AST) -> list[str]:
    package = branch_of(where)
    if package not in BRANCHES and package not in SHARED:
        return []
    found = []
    for line, module, name in imported(tree):
        reached = target(module, name)
        if reached is None or reached[0] == package:
            continue
        if package in BRANCHES and reached[1] == LAYOUT:
            continue
        what = f"from {module} import {name}" if name else f"import {module}"
        allowed = "no branch package" if package in SHARED else f"only another branch's {LAYOUT}"
        found.append(f"{where}:{line}: `{what}`: pipeline.{package} may import {allowed}")
    return found


def check(where: str, source: str) -> list[str]:
    tree = ast.parse(source, filename=where)
    return private_imports(where, tree) + branch_imports(where, tree)


def project_files() -> list[Path]:
    files = [path for top in SCANNED for path in sorted((ROOT / top).rglob("*.py"))]
    assert len(files) > 50, f"found only {len(files)} files under {SCANNED} in {ROOT}"
    return files


def test_the_project_keeps_its_package_boundaries():
    found = []
    for path in project_files():
        found += check(str(path.relative_to(ROOT)), path.read_text())
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        (
            "pipeline/steering_vectors/vector.py",
            "from pipeline.common.teacher import _LAYER_PATHS, decoder_blocks",
            "vector.py:1: `from pipeline.common.teacher import _LAYER_PATHS` reaches the private",
        ),
        (
            "tests/sparse_autoencoder/test_sae.py",
            "def test():\n    from pipeline.sparse_autoencoder.model import _dead_in_window",
            "test_sae.py:2: `from pipeline.sparse_autoencoder.model import _dead_in_window`",
        ),
        ("bench/b.py", "import pipeline._private", "`import pipeline._private` reaches"),
        (
            "pipeline/kv_sidecar/sidecar.py",
            "from pipeline.concepts.training import resolve_device",
            "sidecar.py:1: `from pipeline.concepts.training import resolve_device`: "
            "pipeline.kv_sidecar may import only another branch's layout",
        ),
        (
            "pipeline/sparse_autoencoder/sae.py",
            "from pipeline.concepts import students",
            "`from pipeline.concepts import students`",
        ),
        (
            "pipeline/steering_vectors/x.py",
            "import pipeline.kv_sidecar.forces",
            "`import pipeline.kv_sidecar.forces`",
        ),
        (
            "pipeline/common/teacher.py",
            "from pipeline.concepts.layout import KIND",
            "pipeline.common may import no branch package",
        ),
    ],
)
def test_each_kind_of_reach_is_named(where, source, expected):
    found = check(where, source)
    assert len(found) == 1 and expected in found[0], found


def test_what_the_rules_allow():
    allowed = [
        ("pipeline/sparse_autoencoder/sources.py", "from pipeline.concepts.layout import KIND"),
        ("pipeline/sparse_autoencoder/sources.py", "from pipeline.concepts import layout"),
        ("pipeline/kv_sidecar/sidecar.py", "from pipeline.kv_sidecar.losses import TERMS"),
        ("pipeline/concepts/directions.py", "from pipeline.inputs.words import read_concepts"),
        ("pipeline/common/teacher.py", "from pipeline.inputs.tiny_models import is_tiny"),
        ("pipeline/cli.py", "from pipeline.concepts.training import fit"),
        ("tests/kv_sidecar/t.py", "from pipeline.concepts.students import build_model"),
        ("pipeline/concepts/x.py", "from pipeline.concepts import __init__\nimport __future__"),
    ]
    for where, source in allowed:
        assert check(where, source) == [], (where, source)
