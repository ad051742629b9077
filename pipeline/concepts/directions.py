"""Stage `directions`: teacher activations for every concept, in resumable shards.

Reads the concept table of `wordlist`; runs the teacher over each prompt template,
opened by the start token of `directions.start_token` (`pipeline/common/sequence_start.py`:
a decoder without BOS gets its end-of-text token, so position 0's attention sink is never
the concept), pools the hidden state at each requested layer and writes:
shards (concept_id, split, layer_<L>), the train-split mean per layer, the
teacher's input-embedding rows for the tokens concepts use, each concept's
token ids as a template shows them to the teacher (`concept_token_table`: " paris", not
"paris") and its text as UTF-8 bytes (for the character-level student; layout:
`pipeline/concepts/layout.py`), plus `manifest.json` (the extraction:
`pipeline/concepts/direction_extraction.py`, shared with stage `cross_teacher`).
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
