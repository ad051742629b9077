"""Command line: one command per DVC stage, plus `demo`.

    python -m pipeline.cli --help
    python -m pipeline.cli directions --help

Each DVC stage is a fresh process, so `python -m pipeline.cli <stage>` imports
only that stage's module: a training stage does not pay for importing
transformers. `from pipeline.cli import app` gives the app with every command.

A failure prints one line, `error: ...`; `-v` (before the command) adds the traceback:

    python -m pipeline.cli -v directions --params params.yaml ...
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

# Command name -> module whose `command` implements it.
STAGES = {
    "params_check": "pipeline.common.params_check",
    "teachers": "pipeline.inputs.teachers",
    "identities": "pipeline.inputs.identities",
    "wordlist": "pipeline.inputs.wordlist",
    "directions": "pipeline.concepts.directions",
    "distill": "pipeline.concepts.distill",
    "evaluate": "pipeline.concepts.evaluate",
    "analogies": "pipeline.concepts.analogies",
    "multilayer": "pipeline.concepts.multilayer",
    "inverse": "pipeline.concepts.inverse",
    "cross_teacher": "pipeline.concepts.cross_teacher",
    "corpus": "pipeline.inputs.corpus",
    "trajectories": "pipeline.kv_sidecar.trajectories",
    "sidecar": "pipeline.kv_sidecar.sidecar",
    "activations": "pipeline.sparse_autoencoder.activations",
    "sae": "pipeline.sparse_autoencoder.sae",
    "mcdata": "pipeline.steering_vectors.mcdata",
    "steering": "pipeline.steering_vectors.steering",
    "guided_lm": "pipeline.guided_lm.guided_lm",
    "summary": "pipeline.common.summary",
    "report": "pipeline.common.report_page",
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


# What a user can cause and fix: bad params, a missing or unwritable file, a full disk,
# a model out of reach (TeacherLoadError is a RuntimeError). Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, OSError, RuntimeError)
# Set by DVC for a stage's command (dvc/stage/run.py: `DVC_STAGE = stage.addressing`,
# e.g. `distill@linear_probe`); DVC removed that stage's outputs before running it.
DVC_STAGE = "DVC_STAGE"


def run(argv: list[str] | None = None) -> None:
    """Entry point: a failure prints one line, `error: <message>`, and exits 1; with
    `-v` the traceback comes first. A user error (USER_ERRORS) prints no traceback
    otherwise; any other exception does. Under DVC the line ends with how to restore the
    outputs DVC removed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = next((arg for arg in argv if not arg.startswith("-")), None)
    app = make_app([name] if name in COMMANDS else None)
    options = argv[: argv.index(name)] if name is not None else argv
    verbose = "-v" in options or "--verbose" in options
    try:
        app(argv)
    except USER_ERRORS as err:
        fail(err, name, verbose)
    except Exception as err:
        fail(err, name, verbose=True, prefix=f"{type(err).__name__}: ")


def fail(err: BaseException, command: str | None, verbose: bool, prefix: str = "") -> None:
    if verbose:
        traceback.print_exception(err)
    message = " ".join(str(err).split()) or type(err).__name__
    typer.secho(f"error: {prefix}{message}{restore_hint(command)}", fg=typer.colors.RED, err=True)
    raise SystemExit(1) from None


def restore_hint(command: str | None) -> str:
    """Under DVC, how to get back the outputs DVC removed before running the stage."""
    stage = os.environ.get(DVC_STAGE)
    if not stage:
        return ""
    if command == "params_check":
        return f" (stage {stage} runs before every other stage: none of them ran or lost outputs)"
    hint = f"`dvc checkout {stage}` restores them"
    in_git = uncached_outputs(stage)
    if in_git:
        hint += f", `git checkout -- {' '.join(in_git)}` the ones kept in git"
    return f" (DVC removed the outputs of stage {stage} before running it; {hint})"


def uncached_outputs(stage: str) -> list[str]:
    """The outputs of `stage` (`name` or `name@key`) that dvc.yaml marks `cache: false`:
    git keeps those, and `dvc checkout` leaves them alone."""
    import yaml

    name, _, key = stage.partition("@")
    try:
        dvc_yaml = yaml.safe_load((Path(os.environ.get("DVC_ROOT", ".")) / "dvc.yaml").read_text())
        spec = dvc_yaml["stages"][name]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []  # another dvc.yaml (`sub/dvc.yaml:name`) or none: the hint stays general
    spec = spec.get("do", spec)
    return [
        path.replace("${key}", key)
        for section in ("outs", "metrics", "plots")
        for entry in spec.get(section, [])
        if isinstance(entry, dict)
        for path, options in entry.items()
        if isinstance(options, dict) and options.get("cache") is False
    ]


if __name__ == "__main__":
    run()
