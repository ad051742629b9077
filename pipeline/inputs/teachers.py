"""Stage `teachers`: build the random-weight teachers a profile names, as model folders.

The offline tiny profile has no pretrained model to load, so it builds its own:
`teachers.tiny` maps a folder name to a recipe of `pipeline/inputs/tiny_models.py`
(`qwen3`, `llama`), and each becomes `<out>/<name>/`, an ordinary Hugging Face model
folder (config.json, model.safetensors, tokenizer files) that the other stages load
by path like any local model (`directions.model: data/teachers/tiny-qwen3`). Builds
are deterministic, so an edit of the builder that changes no weight changes no hash
and re-runs nothing downstream. With `teachers.tiny: {}` (the real experiment) the
stage writes only `<out>/teachers.json`, and no extraction stage runs the builder's
code: it is not among their code deps.

    python -m pipeline.cli teachers --params params.yaml --out data/teachers
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Annotated

import typer

from pipeline.common.params import load_params
from pipeline.inputs.params import TeachersParams
from pipeline.inputs.tiny_models import save_tiny

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")
INDEX = "teachers.json"


def run(params: TeachersParams, out: Path) -> dict[str, str]:
    """Write each teacher of `params.tiny` under `out`; return folder name -> recipe."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, recipe in params.tiny.items():
        save_tiny(recipe, out / name)
        log.info("teachers: built %s (%s) in %s", name, recipe, out / name)
    (out / INDEX).write_text(json.dumps({"tiny": params.tiny}, indent=2, sort_keys=True) + "\n")
    return dict(params.tiny)


def command(
    out: Annotated[Path, typer.Option(help="Folder that receives one model folder per teacher.")],
    params: Annotated[Path, typer.Option(help="Params file; its `teachers` section.")] = PARAMS,
) -> None:
    """Build the random-weight teachers of `teachers.tiny` as local model folders."""
    built = run(load_params(params, teachers=TeachersParams).teachers, out)
    typer.echo(f"teachers: {len(built)} built -> {out}")
