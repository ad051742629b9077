"""Stage `mcdata`: multiple-choice tasks in HellaSwag format for the steering stage.

Reads the `mcdata` section of params.yaml and, for `category` tasks, the word
list (`concepts.parquet`). Writes `<out>/questions.jsonl` (one record a line: id,
task, split, context, endings[4], label) and `<out>/stats.json` (questions per
task and split, skipped source rows, which categories the category task used).

    python -m pipeline.cli mcdata --params params.yaml --wordlist data/wordlist/concepts.parquet --out data/mcdata
"""  # noqa: E501

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.common.io import atomic_path, write_json
from pipeline.common.params import load_params
from pipeline.inputs.words import read_concepts
from pipeline.steering_vectors.params import McDataParams
from pipeline.steering_vectors.questions import (
    QUESTIONS_FILE,
    McQuestion,
    build_task,
    write_questions,
)

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
PARAMS = Path("params.yaml")


def run(params: McDataParams, wordlist: Path, out: Path) -> dict[str, Any]:
    """Build every task of `params.tasks` into `out`; returns the stats written to stats.json."""
    needs_words = any(task.source == "category" for task in params.tasks.values())
    concepts = read_concepts(Path(wordlist)) if needs_words else None
    questions: list[McQuestion] = []
    stats: dict[str, Any] = {}
    # Every task is built (and so validated) before the first output file is written.
    for name, task in params.tasks.items():
        built, stats[name] = build_task(name, task, params, concepts)
        questions += built
        log.info("mcdata %s: %s", name, stats[name]["questions"])
    out = Path(out)
    with atomic_path(out / QUESTIONS_FILE) as tmp:
        write_questions(tmp, questions)
    write_json(out / STATS_FILE, stats, sort_keys=False)
    return stats


def command(
    out: Annotated[Path, typer.Option(help="Folder for questions.jsonl and stats.json.")],
    wordlist: Annotated[
        Path, typer.Option(help="concepts.parquet of the wordlist stage (category tasks).")
    ],
    params: Annotated[Path, typer.Option(help="Params file; its `mcdata` section.")] = PARAMS,
) -> None:
    """Build the multiple-choice tasks (HellaSwag format) with disjoint train/val/test splits."""
    stats = run(load_params(params, mcdata=McDataParams).mcdata, wordlist, out)
    counts = "; ".join(
        f"{name} " + ", ".join(f"{s} {n}" for s, n in task["questions"].items())
        for name, task in stats.items()
    )
    typer.echo(f"mcdata: {counts} -> {out}")


if __name__ == "__main__":
    typer.run(command)
