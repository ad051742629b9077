"""Stage `wordlist`: the concept list.

Reads the `wordlist` section of params.yaml and either the wordfreq package's
English list (offline) or the NLTK `words` + `wordnet` corpora, downloaded into
`<out>/nltk_data`. Writes `<out>/concepts.parquet` (id, text, split, source,
pos, category, freq_rank) and `<out>/stats.json` (counts per split and per
dropped-word filter, `split_by`, and `test_sharing_train_stem`: the share of test
words with a Snowball stem also in train).

    python -m pipeline.cli wordlist --params params.yaml --out data/wordlist
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import pyarrow.parquet as pq
import typer

from pipeline.common.io import atomic_path, write_json
from pipeline.common.params import load_params
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.words import CONCEPTS_FILE, build_concepts

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
NLTK_DIR = "nltk_data"
PARAMS = Path("params.yaml")


def run(params: WordlistParams, out: Path) -> dict:
    """Build the concept table into `out`; returns the stats also written to stats.json."""
    # Everything is validated in build_concepts before the first output file is written.
    table, stats = build_concepts(params, nltk_dir=out / NLTK_DIR)
    with atomic_path(out / CONCEPTS_FILE) as tmp:
        pq.write_table(table, tmp)
    write_json(out / STATS_FILE, stats, sort_keys=False)
    return stats


def command(
    out: Annotated[Path, typer.Option(help="Folder for concepts.parquet, stats.json, nltk_data.")],
    params: Annotated[Path, typer.Option(help="Params file; its `wordlist` section.")] = PARAMS,
) -> None:
    """Build the concept list: filter, select the most frequent words, split 70/15/15 by hash."""
    cfg = load_params(params, wordlist=WordlistParams).wordlist
    stats = run(cfg, out)
    splits = ", ".join(f"{name} {count}" for name, count in stats["splits"].items())
    typer.echo(
        f"wordlist: {stats['total']} concepts from {stats['source']} ({splits}, split by "
        f"{stats['split_by']}; {stats['test_sharing_train_stem']:.1%} of test share a train "
        f"stem) -> {out}"
    )
