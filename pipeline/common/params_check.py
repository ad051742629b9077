"""Stage `params_check`: the whole params file, validated before any other stage runs.

DVC removes a stage's outputs before it runs the stage's command, and re-runs a stage
only when a param that stage lists changes. So without this stage a bad value costs the
outputs of the stage that reads it, and a typo in a key that no stage lists is never
read at all. This stage depends on the params file as a whole, and every other stage
depends on its output, so after any edit of the file DVC runs it first: every section,
every key at every level, types, ranges, finite floats and the cross-section rules
(`pipeline/common/params.py` and each branch's `params.py`). Its output is a constant
marker, so DVC sees an unchanged dep downstream and a valid edit re-runs only the
stages whose own params changed.

    python -m pipeline.cli params_check --params params.yaml --out data/params_check.txt
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.common.io import write_text
from pipeline.common.params import load_params

PARAMS = Path("params.yaml")
MARKER = (
    "The params file passed stage params_check. This text never changes, so a valid\n"
    "edit of the params re-runs only the stages whose own params changed.\n"
)


def run(params: Path, out: Path) -> dict[str, int]:
    """Validate every section of `params` (raises ValueError naming the key); write the
    marker to `out`."""
    sections = load_params(params)
    write_text(out, MARKER)
    return {"sections": len(sections.names)}


def command(
    out: Annotated[Path, typer.Option(help="Marker file, written when the params are valid.")],
    params: Annotated[Path, typer.Option(help="Params file; all its sections.")] = PARAMS,
) -> None:
    """Validate the whole params file before any other stage runs."""
    stats = run(params, out)
    typer.echo(f"params_check: {params} is valid ({stats['sections']} sections) -> {out}")
