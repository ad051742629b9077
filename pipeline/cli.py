"""Command line: one command per DVC stage, plus helpers for the tiny profile.

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
from pathlib import Path
from typing import Annotated

import typer

# Command name -> module whose `command` implements it.
STAGES = {
    "wordlist": "stages.wordlist",
    "directions": "stages.directions",
    "distill": "stages.distill",
    "evaluate": "stages.evaluate",
    "corpus": "stages.corpus",
    "trajectories": "stages.trajectories",
    "sidecar": "stages.sidecar",
    "activations": "stages.activations",
    "sae": "stages.sae",
    "mcdata": "stages.mcdata",
    "steering": "stages.steering",
}


def build_tiny_command(
    out: Annotated[Path, typer.Option(help="Folder to write the model and tokenizer to.")],
    model: Annotated[str, typer.Option(help="Which tiny teacher to build.")] = "tiny:qwen3",
) -> None:
    """Save a tiny teacher as an ordinary HF model folder (then load it by path)."""
    from pipeline.tiny import save_tiny

    typer.echo(f"wrote {save_tiny(model, out)}")


def demo_command(
    workspace: Annotated[Path, typer.Option(help="Where the tiny-profile copy runs.")] = Path(
        "build/demo"
    ),
) -> None:
    """Run the whole DAG offline on the tiny profile through `dvc repro`; print the table."""
    from pipeline.demo import run_demo

    typer.echo(run_demo(workspace))


def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def make_app(stages: list[str] | None = None) -> typer.Typer:
    """The CLI with the given stage commands (all by default) and the helper commands."""
    app = typer.Typer(
        help="Activation distillation: the commands behind each stage of dvc.yaml.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(main)
    for name in STAGES if stages is None else stages:
        app.command(name)(importlib.import_module(STAGES[name]).command)
    app.command("build-tiny")(build_tiny_command)
    app.command("demo")(demo_command)
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
    app = make_app(wanted if wanted and wanted[0] in STAGES else None)
    try:
        app()
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
