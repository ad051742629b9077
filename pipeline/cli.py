"""Command line: one command per DVC stage, plus helpers for the tiny profile.

python -m pipeline.cli --help
python -m pipeline.cli directions --help
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from stages import directions, distill, evaluate, wordlist

app = typer.Typer(
    help="Activation distillation: the commands behind each stage of dvc.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("wordlist")(wordlist.command)
app.command("directions")(directions.command)
app.command("distill")(distill.command)
app.command("evaluate")(evaluate.command)


@app.command("build-tiny")
def build_tiny_command(
    out: Annotated[Path, typer.Option(help="Folder to write the model and tokenizer to.")],
    model: Annotated[str, typer.Option(help="Which tiny teacher to build.")] = "tiny:qwen3",
) -> None:
    """Save a tiny teacher as an ordinary HF model folder (then load it by path)."""
    from pipeline.tiny import save_tiny

    typer.echo(f"wrote {save_tiny(model, out)}")


@app.command("demo")
def demo_command(
    workspace: Annotated[Path, typer.Option(help="Where the tiny-profile copy runs.")] = Path(
        "build/demo"
    ),
) -> None:
    """Run the whole DAG offline on the tiny profile through `dvc repro`; print the table."""
    from pipeline.demo import run_demo

    typer.echo(run_demo(workspace))


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def run() -> None:
    """Entry point: a user error (bad params, missing file, model out of reach) prints one
    clear message and exits 1; anything else keeps its traceback."""
    from pipeline.teacher import TeacherLoadError

    try:
        app()
    except (ValueError, FileNotFoundError, TeacherLoadError, RuntimeError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run()
