"""`pipeline.cli`: help for every command, params errors before any output."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app

# Each command's own options (besides --help); dvc.yaml passes these.
OPTIONS = {
    "wordlist": ["--out", "--params"],
    "directions": ["--wordlist", "--out", "--params"],
    "distill": ["--run", "--directions", "--out", "--params"],
    "evaluate": ["--directions", "--distill", "--metrics", "--table", "--plot", "--params"],
    "corpus": ["--out", "--params"],
    "trajectories": ["--corpus", "--out", "--params"],
    "sidecar": ["--trajectories", "--out", "--metrics", "--table", "--params"],
    "activations": ["--corpus", "--out", "--params"],
    "sae": [
        *("--source", "--wordlist", "--corpus", "--compare", "--out", "--metrics"),
        *("--table", "--exemplars", "--curves", "--params"),
    ],
    "mcdata": ["--out", "--wordlist", "--params"],
    "steering": ["--mcdata", "--out", "--metrics", "--table", "--params"],
    "teachers": ["--out", "--params"],
    "demo": ["--workspace"],
}
# Required path options of each stage command, all pointing at files that do not exist.
STAGE_ARGS = {
    "wordlist": ["--out", "out"],
    "directions": ["--wordlist", "concepts.parquet", "--out", "out"],
    "distill": ["--run", "linear_probe", "--directions", "directions", "--out", "out"],
    "evaluate": [
        *("--directions", "directions", "--distill", "distill", "--metrics", "out/m.json"),
        *("--table", "out/t.md", "--plot", "out/p.png"),
    ],
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def plain(text: str) -> str:
    """Help text without colour codes (rich adds them where a CI forces a terminal)."""
    return ANSI.sub("", text)


def test_app_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "Activation distillation" in text and "--verbose" in text
    for name in OPTIONS:
        assert name in text


def test_every_command_is_covered_here():
    assert set(typer.main.get_command(app).commands) == set(OPTIONS)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_command_help_mentions_its_options(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    for option in OPTIONS[name]:
        assert option in text, f"{name} --help lacks {option}"
    declared = typer.main.get_command(app).commands[name].params
    long_opts = {opt for param in declared for opt in param.opts if opt.startswith("--")}
    assert long_opts - {"--help"} == set(OPTIONS[name])


@pytest.mark.parametrize("name", list(STAGE_ARGS))
def test_invalid_params_fail_before_any_output(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("wordlist:\n  num_concepts: 10\n  bogus: 1\n")
    result = invoke(name, "--params", str(params), *STAGE_ARGS[name])
    assert result.exit_code != 0
    message = result.output + str(result.exception)
    assert isinstance(result.exception, ValueError), message
    assert "wordlist.bogus" in message and str(params) in message
    assert not (tmp_path / "out").exists()


def test_missing_params_file_fails_with_its_name(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = invoke("wordlist", "--params", str(missing), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0
    assert isinstance(result.exception, FileNotFoundError)
    assert str(missing) in str(result.exception)
