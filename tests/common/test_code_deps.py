"""Code deps: each stage's dvc.yaml deps are exactly the project files it imports."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.common.code_deps import (
    PARAMS_CHECK,
    ROOT,
    code_deps_drift,
    code_fingerprint,
    dvc_stage_modules,
    import_closure,
    stage_closure,
    stage_modules,
)
from pipeline.common.params import SECTIONS


def write_package(root: Path) -> None:
    files = {
        "pipeline/__init__.py": "",
        "pipeline/cli.py": "import importlib\nSTAGES = {'a': 'pipeline.branch.stage'}\n",
        "pipeline/branch/__init__.py": "",
        "pipeline/branch/stage.py": (
            "from __future__ import annotations\n"
            "from typing import TYPE_CHECKING\n"
            "import numpy\n"
            "from pipeline.branch import helper\n"
            "from .layout import KIND\n"
            "if TYPE_CHECKING:\n"
            "    from pipeline.branch import typing_only\n"
            "def run():\n"
            "    from pipeline.shared.io import write\n"
        ),
        "pipeline/branch/helper.py": "from pipeline.shared import io\n",
        "pipeline/branch/layout.py": "KIND = 'k'\n",
        "pipeline/branch/typing_only.py": "",
        "pipeline/branch/unused.py": "",
        "pipeline/shared/__init__.py": "",
        "pipeline/shared/io.py": "import json\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_closure_follows_every_runtime_import_and_nothing_else(tmp_path):
    write_package(tmp_path)
    assert import_closure("pipeline.branch.stage", tmp_path) == [
        "pipeline/__init__.py",
        "pipeline/branch/__init__.py",
        "pipeline/branch/helper.py",  # from pkg import submodule
        "pipeline/branch/layout.py",  # relative import
        "pipeline/branch/stage.py",
        "pipeline/shared/__init__.py",  # parent package of an import inside a function
        "pipeline/shared/io.py",
    ]
    assert "pipeline/cli.py" in stage_closure("pipeline.branch.stage", tmp_path)


def test_fingerprint_changes_with_the_closure_only(tmp_path):
    write_package(tmp_path)
    before = code_fingerprint("pipeline.branch.stage", tmp_path)
    (tmp_path / "pipeline/branch/unused.py").write_text("x = 1\n")
    (tmp_path / "pipeline/branch/typing_only.py").write_text("x = 1\n")
    assert code_fingerprint("pipeline.branch.stage", tmp_path) == before
    (tmp_path / "pipeline/shared/io.py").write_text("import json  # edited\n")
    after = code_fingerprint("pipeline.branch.stage", tmp_path)
    assert after != before
    assert [k for k in after if after[k] != before[k]] == ["pipeline/shared/io.py"]


def test_dvc_yaml_code_deps_equal_each_stage_import_closure():
    drift = code_deps_drift(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert not drift, "\n".join(drift + ["fix: python -m pipeline.common.code_deps --write"])


def test_drift_is_reported_in_both_directions_naming_stage_and_file():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    deps = dvc_yaml["stages"]["sidecar"]["deps"]
    deps.remove("pipeline/kv_sidecar/losses.py")
    deps.append("pipeline/steering_vectors/vector.py")
    assert code_deps_drift(dvc_yaml) == [
        "stage 'sidecar': add pipeline/kv_sidecar/losses.py to its deps (it runs that code)",
        "stage 'sidecar': remove pipeline/steering_vectors/vector.py from its deps "
        "(it never imports it)",
    ]


def test_every_cli_stage_is_a_dvc_stage_and_stages_do_not_import_each_other():
    dvc_stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    modules = stage_modules()
    # Each stage of dvc.yaml runs one CLI command; `distill` also backs `distill_analogy`.
    run = dvc_stage_modules(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert set(run) == set(dvc_stages) and set(run.values()) == set(modules.values())
    assert run["distill_analogy"] == run["distill"] == modules["distill"]
    stage_files = {name: module.replace(".", "/") + ".py" for name, module in modules.items()}
    for name, module in modules.items():
        others = set(stage_files.values()) - {stage_files[name]}
        assert not others & set(stage_closure(module)), name


def test_the_tiny_teacher_builder_runs_in_stage_teachers_only():
    """Editing the demo's model builder must not re-run a real extraction."""
    for stage, module in stage_modules().items():
        runs_builder = "pipeline/inputs/tiny_models.py" in stage_closure(module)
        assert runs_builder == (stage == "teachers"), stage


def test_the_params_check_runs_the_module_of_every_params_section():
    """It imports them by name (`SECTIONS`); editing a section's checks must re-run it."""
    files = {spec.partition(":")[0].replace(".", "/") + ".py" for spec in SECTIONS.values()}
    assert len(files) == 6
    assert files <= set(stage_closure(PARAMS_CHECK))
    directions = set(stage_closure(stage_modules()["directions"]))
    assert "pipeline/kv_sidecar/params.py" not in directions, "only the check gains them"
