"""Stage `identities`: what each stage reads that DVC cannot see in params.yaml, one small
JSON file per stage, so DVC re-runs a stage exactly when one of them changes.

A `model` param names a hub id or a folder, not the weights: a new commit on `main`, or a
byte rewritten in a local folder, changes no param. Likewise the files a `corpus.files`
glob matches, the `source: jsonl` task files, and what `compute_dtype: auto` stands for
on this machine. This stage is `always_changed` in dvc.yaml: it runs on every `dvc repro`
(hashing the local model folders, asking the hub for the commit of a revision) and
writes `<out>/<stage>.json` for each stage that reads such an input; the stage depends on
that file, whose content changes only when one of its inputs does (identities and
hashes: `pipeline/common/identity.py`).

    python -m pipeline.cli identities --params params.yaml --out data/identities

    # data/identities/directions.json
    {"directions.model": {"model": "data/teachers/all-minilm-l6-v2", "revision": null,
                          "sha256": "53aa..."},
     "directions.compute_dtype": "float32"}
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.common.devices import resolve_device
from pipeline.common.identity import (
    corpus_files,
    files_sha256,
    model_identity,
    resolve_compute_dtype,
)
from pipeline.common.io import write_json
from pipeline.common.params import Sections, load_params

PARAMS = Path("params.yaml")


def stage_inputs(params: Sections) -> dict[str, dict[str, Any]]:
    """Stage name -> {dotted params key: what it resolves to}, for every stage that loads
    a model or reads local files named by a param."""
    models: dict[tuple[str, str], dict[str, str | None]] = {}

    def model(name: str) -> dict[str, str | None]:
        section = getattr(params, name)  # one hash per folder, one hub call per revision
        key = (section.model, section.revision)
        if key not in models:
            found = model_identity(section.model, section.revision, f"{name}.model")
            models[key] = found.as_dict()
        return models[key]

    def dtype(name: str, field: str = "compute_dtype") -> str:
        section = getattr(params, name)
        device = resolve_device(section.device)
        return resolve_compute_dtype(getattr(section, field), device, key=f"{name}.{field}")

    corpus = {"corpus.model": model("corpus")}
    if params.corpus.source == "files":
        corpus["corpus.files"] = files_sha256(corpus_files(params.corpus.files))
    return {
        "directions": {
            "directions.model": model("directions"),
            "directions.compute_dtype": dtype("directions"),
        },
        "corpus": corpus,
        "trajectories": {
            "trajectories.model": model("trajectories"),
            "trajectories.compute_dtype": dtype("trajectories"),
        },
        # The sidecar scores with the trajectories' teacher, the SAE splices into the
        # activations' one (sae.input: activations), guided_lm reads the corpus tokenizer.
        "sidecar": {"trajectories.model": model("trajectories")},
        "activations": {
            "activations.model": model("activations"),
            "activations.compute_dtype": dtype("activations"),
        },
        "sae": {"activations.model": model("activations")}
        if params.sae.input == "activations"
        else {},
        "cross_teacher": {}
        if params.cross_teacher.model is None
        else {
            "cross_teacher.model": model("cross_teacher"),
            "cross_teacher.compute_dtype": dtype("cross_teacher"),
        },
        "steering": {
            "steering.model": model("steering"),
            "steering.dtype": dtype("steering", "dtype"),
        },
        "guided_lm": {"corpus.model": model("corpus")},
        "mcdata": _task_files(params.mcdata.tasks),
    }


def _task_files(tasks: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{mcdata.tasks.<name>.path: {path: sha256}} of the `source: jsonl` tasks."""
    found = {}
    for name, task in tasks.items():
        if task.source != "jsonl":
            continue
        path = Path(task.path)
        if not path.is_file():
            raise FileNotFoundError(
                f"mcdata.tasks.{name}.path={task.path!r}: multiple-choice JSONL file not found"
            )
        found[f"mcdata.tasks.{name}.path"] = files_sha256([path])
    return found


def run(params: Sections, out: Path) -> dict[str, dict[str, Any]]:
    """Write `<out>/<stage>.json` for each stage of `stage_inputs`; return them."""
    inputs = stage_inputs(params)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for stage, values in inputs.items():
        write_json(out / f"{stage}.json", values)
    return inputs


def command(
    out: Annotated[Path, typer.Option(help="Folder for one <stage>.json per stage.")],
    params: Annotated[
        Path, typer.Option(help="Params file; its sections that name inputs.")
    ] = PARAMS,
) -> None:
    """Resolve each stage's model identities, local input files and `auto` dtypes."""
    inputs = run(load_params(params), out)
    typer.echo(f"identities: {len(inputs)} stages -> {out}; {'; '.join(described(inputs))}")


def described(inputs: dict[str, dict[str, Any]]) -> list[str]:
    """One short item per distinct model (its commit or content hash, 12 hex) and per
    hashed file list: the log says what was resolved without repeating it per stage."""
    items: dict[str, str] = {}
    for values in inputs.values():
        for key, value in values.items():
            if isinstance(value, dict) and "model" in value:
                rev = value["revision"]
                identity = f"commit {rev[:12]}" if rev else f"sha256 {value['sha256'][:12]}"
                items.setdefault(value["model"], f"{value['model']} {identity}")
            elif isinstance(value, dict):
                items.setdefault(key, f"{key}: {len(value)} file(s) hashed")
            else:
                items.setdefault(key, f"{key}={value}")
    return list(items.values())


if __name__ == "__main__":
    typer.run(command)
