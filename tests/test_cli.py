"""`pipeline.cli`: help for every command, params errors before any output, and every
user-facing failure as one line (the traceback only with -v; under DVC, how to restore)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.cli import app, run

TINY = Path(__file__).resolve().parents[1] / "profiles" / "tiny.yaml"

# Each command's own options (besides --help); dvc.yaml passes these.
OPTIONS = {
    "wordlist": ["--out", "--params"],
    "directions": ["--wordlist", "--out", "--params"],
    "distill": ["--run", "--directions", "--out", "--live", "--params", "--analogies"],
    "evaluate": [
        *("--directions", "--distill", "--live", "--metrics", "--table", "--plot", "--params"),
        "--analogies",
    ],
    "multilayer": ["--directions", "--metrics", "--table", "--params"],
    "inverse": ["--directions", "--metrics", "--table", "--params"],
    "cross_teacher": [
        *("--wordlist", "--main-metrics", "--main-directions", "--out", "--metrics"),
        *("--table", "--params"),
    ],
    "corpus": ["--out", "--metrics", "--params"],
    "trajectories": ["--corpus", "--out", "--params"],
    "sidecar": [
        *("--trajectories", "--corpus", "--out", "--live", "--metrics", "--table"),
        *("--plot-training", "--plot-lm-loss", "--params"),
    ],
    "activations": ["--corpus", "--out", "--params"],
    "sae": [
        *("--source", "--wordlist", "--corpus", "--compare", "--out", "--metrics"),
        *("--table", "--exemplars", "--live", "--plot-training", "--plot-density", "--params"),
    ],
    "mcdata": ["--out", "--wordlist", "--params"],
    "analogies": ["--wordlist", "--out", "--params"],
    "steering": ["--mcdata", "--out", "--live", "--metrics", "--table", "--plot", "--params"],
    "guided_lm": [
        "--corpus",
        "--directions",
        "--metrics",
        "--table",
        "--plot",
        "--curve",
        "--params",
    ],
    "teachers": ["--out", "--params"],
    "identities": ["--out", "--params"],
    "params_check": ["--out", "--params"],
    "summary": ["--out", "--table", "--metrics"],
    "report": ["--out", "--table", "--image"],
    "demo": ["--workspace"],
}
# Required path options of each stage command, all pointing at files that do not exist.
STAGE_ARGS = {
    "wordlist": ["--out", "out"],
    "directions": ["--wordlist", "concepts.parquet", "--out", "out"],
    "distill": [
        *("--run", "linear_probe", "--directions", "directions", "--out", "out"),
        *("--live", "out/live"),
    ],
    "evaluate": [
        *("--directions", "directions", "--distill", "distill", "--live", "live"),
        *("--metrics", "out/m.json"),
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


def edited_tiny(tmp_path: Path, **values) -> Path:
    """profiles/tiny.yaml with dotted keys set, e.g. edited_tiny(p, **{"sae.lr": 1.0})."""
    raw = yaml.safe_load(TINY.read_text())
    for dotted, value in values.items():
        *parents, last = dotted.split(".")
        node = raw
        for name in parents:
            node = node[name]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def failure(capsys, *argv: str) -> list[str]:
    """The lines `pipeline.cli` prints on stderr for a command that must fail with exit 1."""
    with pytest.raises(SystemExit) as exit_:
        run(list(argv))
    assert exit_.value.code == 1
    return capsys.readouterr().err.splitlines()


def failures(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Kind of failure -> (command line, what its one line says)."""
    out = str(tmp_path / "out")
    unreachable = "no-such-org/no-such-model"
    hub = edited_tiny(
        tmp_path / "hub",
        **{f"{s}.model": unreachable for s in ("corpus", "trajectories", "activations")},
    )
    folder = "models/not-here/tinyllama"
    local = edited_tiny(
        tmp_path / "local",
        **{f"{s}.model": folder for s in ("corpus", "trajectories", "activations")},
    )
    bad = edited_tiny(tmp_path / "bad", **{"sae.lr": float("inf")})
    missing = tmp_path / "missing.parquet"
    valid = edited_tiny(tmp_path / "valid")
    return {
        "bad params": (
            ["directions", "--params", str(bad), "--wordlist", str(missing), "--out", out],
            f"error: {bad}: sae.lr must be a finite float, got inf",
        ),
        "missing file": (
            ["directions", "--params", str(valid), "--wordlist", str(missing), "--out", out],
            f"error: concept table not found: {missing} (run the `wordlist` stage first)",
        ),
        "unreachable model": (
            ["corpus", "--params", str(hub), "--out", out],
            f"error: corpus.model={unreachable!r}: revision 'main' is not in the local Hugging "
            "Face cache",
        ),
        "missing model folder": (
            ["corpus", "--params", str(local), "--out", out],
            f"error: model folder not found: {folder} (corpus.model)",
        ),
    }


KINDS = ["bad params", "missing file", "unreachable model", "missing model folder"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    for name in ("hub", "local", "bad", "valid"):
        (tmp_path / name).mkdir()


@pytest.mark.parametrize("kind", KINDS)
def test_a_user_error_is_one_line_without_a_traceback(capsys, tmp_path, offline, kind):
    argv, expected = failures(tmp_path)[kind]
    lines = failure(capsys, *argv)
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_verbose_prints_the_traceback_then_the_same_line(capsys, tmp_path, offline, kind):
    argv, expected = failures(tmp_path)[kind]
    lines = failure(capsys, "-v", *argv)
    assert "Traceback (most recent call last):" in lines
    assert lines[-1].startswith(expected), lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1


def test_the_unreachable_model_line_keeps_the_way_out(capsys, tmp_path, offline):
    argv, _ = failures(tmp_path)["unreachable model"]
    (line,) = failure(capsys, *argv)
    assert "corpus.model" in line and "make demo" in line


def test_under_dvc_the_line_ends_with_how_to_restore_the_outputs(
    capsys, tmp_path, offline, monkeypatch
):
    monkeypatch.setenv("DVC_STAGE", "directions")
    argv, expected = failures(tmp_path)["missing file"]
    (line,) = failure(capsys, *argv)
    assert line.startswith(expected)
    assert line.endswith(
        "(DVC removed the outputs of stage directions before running it; "
        "`dvc checkout directions` restores them)"
    )


def test_params_check_passes_a_valid_file_and_names_the_bad_key(capsys, tmp_path, offline):
    marker = tmp_path / "check.txt"
    with pytest.raises(SystemExit) as done:
        run(
            ["params_check", "--params", str(edited_tiny(tmp_path / "valid")), "--out", str(marker)]
        )
    assert done.value.code == 0
    written = marker.read_text()
    marker.unlink()

    bad = edited_tiny(tmp_path / "bad", **{"directions.shard_row": 100})
    (line,) = failure(capsys, "params_check", "--params", str(bad), "--out", str(marker))
    assert line.startswith(f"error: {bad}: unknown key 'directions.shard_row' in directions")
    assert not marker.exists()
    other = edited_tiny(tmp_path / "valid", **{"distill.train.lr": 0.5})
    with pytest.raises(SystemExit):
        run(["params_check", "--params", str(other), "--out", str(marker)])
    assert marker.read_text() == written, "the marker must not depend on the params"


def test_under_dvc_outputs_kept_in_git_are_named_too(capsys, tmp_path, offline, monkeypatch):
    """`dvc checkout` skips `cache: false` outputs (metrics): the line names them for git."""
    monkeypatch.setenv("DVC_ROOT", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("DVC_STAGE", "evaluate")
    argv, expected = failures(tmp_path)["bad params"]
    (line,) = failure(capsys, *argv)
    assert line.startswith(expected)
    assert line.endswith(
        "`dvc checkout evaluate` restores them, `git checkout -- metrics/comparison.md "
        "metrics/plots/distill_val_curves.png metrics/distill.json` the ones kept in git)"
    )
    monkeypatch.setenv("DVC_STAGE", "distill@linear_probe")
    (line,) = failure(capsys, *argv)
    assert line.endswith(
        "`dvc checkout distill@linear_probe` restores them, `git checkout -- "
        "metrics/live/distill/linear_probe/metrics.json` the ones kept in git)"
    )
