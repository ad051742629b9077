"""Stage `directions`: teacher activations for every concept, in resumable shards.

What it reads, computes and writes is `pipeline/concepts/direction_extraction.py`
(shared with stage `cross_teacher`), run here for the main teacher of `directions.*`.
A killed run resumes from its finished shards; under torchrun each rank computes
its own shards and rank 0 writes the manifest (`pipeline/common/extraction.py`).

    python -m pipeline.cli directions --params params.yaml \
        --wordlist data/wordlist/concepts.parquet --out data/directions
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.common.extraction import ShardedExtraction
from pipeline.common.params import load_params
from pipeline.concepts.direction_extraction import RESULT_NEUTRAL, extract
from pipeline.concepts.layout import KIND
from pipeline.concepts.params import DirectionsParams

PARAMS = Path("params.yaml")
EXTRACTION = ShardedExtraction("directions", KIND, __name__, result_neutral=RESULT_NEUTRAL)


def run(params: DirectionsParams, wordlist: Path, out: Path) -> dict:
    """Extract every concept of `wordlist` through `params.model` into `out`."""
    return extract(params, wordlist, out, EXTRACTION)


def command(
    wordlist: Annotated[Path, typer.Option(help="Concept table written by the wordlist stage.")],
    out: Annotated[Path, typer.Option(help="Output folder for shards and manifest.")],
    params: Annotated[Path, typer.Option(help="Params file; its `directions` section.")] = PARAMS,
) -> None:
    """Extract per-concept teacher activations into safetensors shards (resumable)."""
    stats = run(load_params(params, directions=DirectionsParams).directions, wordlist, out)
    typer.echo(f"directions: {json.dumps(stats)}")
