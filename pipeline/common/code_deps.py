"""The code a stage runs: the project modules its entry point imports, transitively.

Derived from the source with `ast`, never kept by hand, and used twice: as each
stage's code deps in `dvc.yaml` (a test fails on drift in either direction) and in
the resume fingerprint of the extraction stages, so editing a module a stage runs
re-runs that stage and editing any other module does not.

Every import statement counts, inside functions too, except those under
`if TYPE_CHECKING:` (they never run). Imports by name through `importlib` are not
seen: the CLI dispatches to stage modules that way, so `pipeline/cli.py` alone is
common to every stage. One such import is counted: stage `params_check` exists to run
every section's checks, so its closure holds the module of each params section
(`SECTIONS`, which `load_params` imports by name); for any other stage a section it does
not read can only make it fail, never change its result.

    python -m pipeline.common.code_deps          # each stage's closure
    python -m pipeline.common.code_deps --write  # rewrite the code deps in dvc.yaml
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pipeline"
ENTRY = "pipeline.cli"
PARAMS_CHECK = "pipeline.common.params_check"


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a project module (`a.b` -> a/b.py or a/b/__init__.py), if there is one."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(module: str, path: Path) -> set[str]:
    """Module names `path` imports (absolute), including `from pkg import submodule`."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        names.add(source)
        names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


@cache
def _closure(module: str, root: Path) -> tuple[str, ...]:
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or not (name == PACKAGE or name.startswith(PACKAGE + ".")):
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            continue  # an attribute (`from pkg import function`), not a module
        files.add(path)
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        todo.extend(name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1))
        todo.extend(_imported_modules(name, path))
    return tuple(sorted(str(path.relative_to(root)) for path in files))


def import_closure(module: str, root: Path = ROOT) -> list[str]:
    """Project files (relative to `root`, sorted) that `import module` executes."""
    return list(_closure(module, root))


def stage_closure(module: str, root: Path = ROOT) -> list[str]:
    """The files a stage run as `python -m pipeline.cli <stage>` executes."""
    modules = [module, ENTRY] + (section_modules() if module == PARAMS_CHECK else [])
    return sorted({name for m in modules for name in import_closure(m, root)})


def section_modules() -> list[str]:
    """The modules of the params sections, which `load_params` imports by name."""
    from pipeline.common.params import SECTIONS

    return sorted({spec.partition(":")[0] for spec in SECTIONS.values()})


def code_fingerprint(module: str, root: Path = ROOT) -> dict[str, str]:
    """sha256 of every file of the stage's closure: the code part of a resume fingerprint."""
    return {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest()
        for name in stage_closure(module, root)
    }


def stage_modules() -> dict[str, str]:
    from pipeline.cli import STAGES

    return dict(STAGES)


COMMAND = re.compile(r"python -m pipeline\.cli (\w+)")


def dvc_stage_modules(dvc_yaml: dict) -> dict[str, str]:
    """DVC stage -> the module its `cmd` runs (`python -m pipeline.cli <command>`): one
    command may back several stages (`distill` runs `distill@<run>` and
    `distill_analogy@<run>`)."""
    modules = stage_modules()
    found = {}
    for name, spec in dvc_yaml["stages"].items():
        match = COMMAND.search(str((spec.get("do") or spec)["cmd"]))
        if match is not None and match.group(1) in modules:
            found[name] = modules[match.group(1)]
    return found


def dvc_stage_deps(dvc_yaml: dict, stage: str) -> list[str]:
    """The `deps` of `stage` in a parsed dvc.yaml (inside `do:` for a foreach stage)."""
    spec = dvc_yaml["stages"][stage]
    return list((spec.get("do") or spec).get("deps", []))


def code_deps_drift(dvc_yaml: dict, root: Path = ROOT) -> list[str]:
    """One line per stage whose listed code deps differ from its import closure."""
    problems = []
    run = dvc_stage_modules(dvc_yaml)
    for stage, module in stage_modules().items():
        if module not in run.values():
            problems.append(f"stage {stage!r} ({module}) is missing from dvc.yaml")
    for stage, module in run.items():
        listed = {d for d in dvc_stage_deps(dvc_yaml, stage) if d.endswith(".py")}
        closure = set(stage_closure(module, root))
        for name in sorted(closure - listed):
            problems.append(f"stage {stage!r}: add {name} to its deps (it runs that code)")
        for name in sorted(listed - closure):
            problems.append(f"stage {stage!r}: remove {name} from its deps (it never imports it)")
    return problems


def write_code_deps(path: Path, root: Path = ROOT) -> None:
    """Replace each stage's code deps in dvc.yaml by its closure, keeping the other deps."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 100
    yaml.indent(mapping=2, sequence=4, offset=2)
    data = yaml.load(path.read_text())
    for stage, module in dvc_stage_modules(data).items():
        spec = data["stages"][stage]
        spec = spec.get("do") or spec
        deps = spec["deps"]
        others = [d for d in deps if not str(d).endswith(".py")]
        deps.clear()
        deps.extend(others + stage_closure(module, root))
    with open(path, "w") as handle:
        yaml.dump(data, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    args = parser.parse_args()
    if args.write:
        write_code_deps(ROOT / "dvc.yaml")
    for stage, module in stage_modules().items():
        print(f"{stage} ({module}):")
        for name in stage_closure(module):
            print(f"  {name}")


if __name__ == "__main__":
    main()
