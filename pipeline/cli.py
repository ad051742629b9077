"""Command line: one command per DVC stage, plus `demo`.

    python -m pipeline.cli --help
    python -m pipeline.cli directions --help

Each DVC stage is a fresh process, so `python -m pipeline.cli <stage>` imports
only that stage's module: a training stage does not pay for importing
transformers. `from pipeline.cli import app` gives the app with every command.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Annotated

import typer

# Command name -> module whose `command` implements it.
STAGES = {
    "teachers": "pipeline.inputs.teachers",
    "wordlist": "pipeline.inputs.wordlist",
    "directions": "pipeline.concepts.directions",
    "distill": "pipeline.concepts.distill",
    "evaluate": "pipeline.concepts.evaluate",
    "corpus": "pipeline.inputs.corpus",
    "trajectories": "pipeline.kv_sidecar.trajectories",
    "sidecar": "pipeline.kv_sidecar.sidecar",
    "activations": "pipeline.sparse_autoencoder.activations",
    "sae": "pipeline.sparse_autoencoder.sae",
    "mcdata": "pipeline.steering_vectors.mcdata",
    "steering": "pipeline.steering_vectors.steering",
}
# Helper commands outside the DAG, likewise by module.
HELPERS = {
    "demo": "pipeline.demo",
}
COMMANDS = STAGES | HELPERS


def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def make_app(stages: list[str] | None = None) -> typer.Typer:
    """The CLI with the given commands (all by default)."""
    app = typer.Typer(
        help="Activation distillation: the commands behind each stage of dvc.yaml.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(main)
    # Modules are imported by name: a stage run imports its own module only, so the
    # code a stage runs (pipeline/common/code_deps.py) holds no other stage.
    for name in COMMANDS if stages is None else stages:
        app.command(name)(importlib.import_module(COMMANDS[name]).command)
    return app


def __getattr__(name: str):
    # `from pipeline.cli import app` builds the full app on first use only.
    if name == "app":
        return make_app()
    raise AttributeError(name)


def run() -> None:
    """Entry point: a user error (bad params, missing file, model out of reach) prints one
    clear message and exits 1 (a model out of reach is a RuntimeError: TeacherLoadError);
    anything else keeps its traceback."""
    wanted = [arg for arg in sys.argv[1:] if not arg.startswith("-")][:1]
    app = make_app(wanted if wanted and wanted[0] in COMMANDS else None)
    try:
        app()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
