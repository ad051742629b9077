"""Every command of the README runs as written, where its block says it runs.

The line before each fenced `bash` block marks it (README, Development): `<!-- demo -->`
(the demo workspace), `<!-- real -->` (the project with the real params.yaml),
`<!-- demo, real -->` (both), `<!-- project -->` (the project root: make targets). The
fast checks read every block: each `dvc` command parses with DVC's own parser (and names
no file where DVC takes a revision), each `-S` value applies through DVC's override
grammar (every point of a sweep) to the params of every place it is marked for and then
passes the strict params loader, each `make` target exists. The slow test runs the demo
blocks' commands, in order, in one shrunk demo workspace.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc.cli import DvcParserError, parse_args
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from pipeline.common.params import load_params
from pipeline.demo import PROFILE, ROOT, offline_env
from tests.test_demo import demo_like_workspace

README = ROOT / "README.md"
PLACES = {"demo", "real", "project"}
# Where each place's params come from.
PARAMS = {"demo": ROOT / PROFILE, "real": ROOT / "params.yaml"}
MARK = re.compile(r"<!-- ([a-z]+(?:, [a-z]+)*) -->")
# dvc subcommands whose positionals are revisions, not paths (DVC 3 takes --targets).
REVISION_COMMANDS = {("metrics", "diff"), ("params", "diff"), ("plots", "diff")}
FILE_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".csv", ".png", ".lock"}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    places: frozenset[str]
    lines: tuple[str, ...]  # command lines, continuations joined, comments kept

    def commands(self) -> list[list[str]]:
        """Each command's argv: `&&` and `;` split a line, comments dropped."""
        argvs = []
        for line in self.lines:
            argv: list[str] = []
            for token in shlex.split(line, comments=True):
                if token in {"&&", ";"}:
                    argvs.append(argv)
                    argv = []
                else:
                    argv.append(token)
            argvs.append(argv)
        return [argv for argv in argvs if argv]


def readme_blocks(text: str) -> list[Block]:
    """The fenced bash blocks of `text` with the places their marker line names; a block
    without a marker, or with an unknown place, raises ValueError naming its line."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```bash":
            index += 1
            continue
        start = index
        previous = lines[start - 1].strip() if start else ""
        mark = MARK.fullmatch(previous)
        if mark is None:
            raise ValueError(f"README line {start + 1}: a bash block without a marker line")
        places = frozenset(mark.group(1).split(", "))
        if places - PLACES:
            raise ValueError(
                f"README line {start + 1}: unknown place {sorted(places - PLACES)} "
                f"(known: {sorted(PLACES)})"
            )
        body: list[str] = []
        index += 1
        while lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        joined: list[str] = []
        for line in body:
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1] + " " + line.strip()
            elif line.strip():
                joined.append(line.strip())
        blocks.append(Block(start + 1, places, tuple(joined)))
        index += 1
    return blocks


def check_dvc(argv: list[str]) -> None:
    """Raise ValueError unless `dvc <argv>` parses and names no file as a revision."""
    try:
        args = parse_args(argv)
    except DvcParserError as error:
        raise ValueError(f"dvc {shlex.join(argv)}: does not parse") from error
    if tuple(argv[:2]) in REVISION_COMMANDS:
        for rev in (args.a_rev, args.b_rev):
            if rev and ("/" in rev or Path(rev).suffix in FILE_SUFFIXES):
                raise ValueError(
                    f"dvc {shlex.join(argv)}: {rev!r} is a path where DVC takes a "
                    "revision (use --targets)"
                )


def set_params(argv: list[str]) -> list[str]:
    """The `-S` values of a `dvc exp run` argv."""
    if argv[:2] != ["exp", "run"]:
        return []
    return list(parse_args(argv).set_param or [])


def check_overrides(overrides: list[str], params: Path, tmp: Path) -> int:
    """Apply `overrides` (each point of their sweep) to a copy of `params` with DVC's
    override code, then load the copy with the strict loader (raises ValueError naming
    the key). The number of points checked."""
    sweeps = get_hydra_sweeps(to_path_overrides(overrides))
    for point in sweeps:
        copy = tmp / "params.yaml"
        shutil.copy2(params, copy)
        for path, values in point.items():
            if path != "params.yaml":
                raise ValueError(f"-S names params file {path!r}; the stages read params.yaml")
            try:
                apply_overrides(copy, values)
            except Exception as error:  # DVC's InvalidArgumentError, from Hydra's
                raise ValueError(f"-S {values} does not apply to {params.name}: {error}") from error
        load_params(copy)
    return len(sweeps)


def make_targets(makefile: Path = ROOT / "Makefile") -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", makefile.read_text(), flags=re.M))


def test_every_bash_block_is_marked_and_every_place_has_blocks():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 8
    assert set().union(*(b.places for b in blocks)) == PLACES


def test_a_block_without_a_marker_or_with_an_unknown_place_fails():
    with pytest.raises(ValueError, match="line 3: a bash block without a marker"):
        readme_blocks("text\n\n```bash\ndvc repro\n```\n")
    with pytest.raises(ValueError, match=r"unknown place \['moon'\]"):
        readme_blocks("<!-- moon -->\n```bash\ndvc repro\n```\n")
    [block] = readme_blocks(
        "<!-- demo, real -->\n```bash\ndvc exp run -S a=1 \\\n  -S b=2   # c\ndvc exp show\n```"
    )
    assert block.places == {"demo", "real"}
    assert block.commands() == [
        ["dvc", "exp", "run", "-S", "a=1", "-S", "b=2"],
        ["dvc", "exp", "show"],
    ]


def test_every_dvc_command_of_the_readme_parses():
    commands = [argv for b in readme_blocks(README.read_text()) for argv in b.commands()]
    dvc_commands = [argv[1:] for argv in commands if argv[0] == "dvc"]
    assert len(dvc_commands) >= 30
    for argv in dvc_commands:
        check_dvc(argv)


def test_a_path_where_dvc_takes_a_revision_or_an_unknown_option_fails():
    with pytest.raises(ValueError, match="'metrics/steering.json' is a path"):
        check_dvc(["metrics", "diff", "metrics/steering.json"])
    check_dvc(["metrics", "diff", "--targets", "metrics/steering.json"])
    check_dvc(["metrics", "diff", "HEAD", "lr-3e-4"])
    with pytest.raises(ValueError, match="does not parse"):
        check_dvc(["exp", "run", "--no-such-option"])


@pytest.mark.parametrize("place", sorted(PARAMS))
def test_every_set_param_of_the_readme_is_valid_where_its_block_runs(place, tmp_path):
    blocks = [b for b in readme_blocks(README.read_text()) if place in b.places]
    runs = [set_params(argv[1:]) for b in blocks for argv in b.commands() if argv[0] == "dvc"]
    runs = [overrides for overrides in runs if overrides]
    assert len(runs) >= {"demo": 2, "real": 10}[place]
    points = sum(check_overrides(overrides, PARAMS[place], tmp_path) for overrides in runs)
    assert points >= len(runs)


def test_a_set_param_that_the_params_reject_fails_naming_the_key(tmp_path):
    real = PARAMS["real"]
    assert check_overrides(["distill.train.lr=1e-3,3e-4,1e-4"], real, tmp_path) == 3
    assert check_overrides(["sae.topk=null,50", "sae.l1_strength=0,1e-3"], real, tmp_path) == 4
    # Layer 20 is not extracted in the real params (directions.layers: [7, 14, 21]).
    with pytest.raises(ValueError, match="distill.train.layer"):
        check_overrides(["distill.train.layer=20"], real, tmp_path)
    # A typo in a key: DVC's override grammar refuses a key the file does not have.
    with pytest.raises(ValueError, match="does not apply"):
        check_overrides(["sae.topk_=50"], real, tmp_path)
    with pytest.raises(ValueError, match="sae.topk"):
        check_overrides(["sae.topk=0"], real, tmp_path)


def test_every_make_target_of_the_readme_exists():
    commands = [argv for b in readme_blocks(README.read_text()) for argv in b.commands()]
    targets = {target for argv in commands if argv[0] == "make" for target in argv[1:]}
    assert {"demo", "test", "setup", "test-fast", "lint"} <= targets
    assert targets <= make_targets()
    assert "no-such-target" not in make_targets()


def test_every_pip_extra_and_every_file_the_readme_reads_exists():
    """`pip install -e '.[x]'`: extra x in pyproject.toml; `cat path`: an output of dvc.yaml."""
    import tomllib

    import yaml

    commands = [argv for b in readme_blocks(README.read_text()) for argv in b.commands()]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = {
        extra
        for argv in commands
        if argv[:3] == ["pip", "install", "-e"]
        for extra in re.fullmatch(r"\.\[([\w,]+)\]", argv[3]).group(1).split(",")
    }
    assert named and named <= set(extras)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outputs = {
        next(iter(out)) if isinstance(out, dict) else out
        for stage in stages.values()
        for kind in ("outs", "metrics", "plots")
        for out in (stage.get("do", stage).get(kind) or [])
    }
    read = {path for argv in commands if argv[0] == "cat" for path in argv[1:]}
    assert read and read <= outputs
    assert "metrics/nothing.md" not in outputs


def run_line(workspace: Path, line: str) -> str:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", line],
        cwd=workspace,
        env=offline_env(),
        capture_output=True,
        text=True,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README command failed in the demo workspace: {line}\n{output}"
    return output


@pytest.mark.slow
def test_every_demo_command_runs_as_written_in_a_demo_workspace(tmp_path_factory):
    workspace = demo_like_workspace(tmp_path_factory)
    blocks = [b for b in readme_blocks(README.read_text()) if "demo" in b.places]
    outputs = {}
    for block in blocks:
        for line in block.lines:
            outputs[line] = run_line(workspace, line)
    # The README's way back to the committed params and results leaves nothing changed
    # (dvc plots show writes its HTML into dvc_plots/, a new folder).
    status = run_line(workspace, "git status --porcelain")
    assert [line for line in status.splitlines() if "dvc_plots" not in line] == []
    # Stage `identities` is always_changed: `dvc status` lists it and nothing else.
    assert run_line(workspace, "dvc status").split() == ["identities:", "always", "changed"]
    params = json.loads(run_line(workspace, "dvc params diff HEAD lr-3e-4 --json"))
    changed = params["params.yaml"]
    assert changed.keys() == {"distill.train.lr"}, "a queued experiment: its own -S, no other"
    assert changed["distill.train.lr"]["new"] == 3e-4


def presets(text: str) -> dict[str, dict[str, str]]:
    """The seed-003 presets of the README: experiment name -> {key: value}."""
    found = {}
    for block in readme_blocks(text):
        for argv in block.commands():
            if argv[:3] == ["dvc", "exp", "run"] and "-n" in argv:
                name = argv[argv.index("-n") + 1]
                if name.startswith("sidecar-v"):
                    pairs = [value.split("=", 1) for value in set_params(argv[1:])]
                    found[name] = dict(pairs)
    return found


def test_each_sidecar_preset_is_one_command_that_sets_every_key_the_presets_differ_in(tmp_path):
    found = presets(README.read_text())
    assert sorted(found) == ["sidecar-v1", "sidecar-v2", "sidecar-v3"]
    keys = {name: set(values) for name, values in found.items()}
    assert keys["sidecar-v1"] == keys["sidecar-v2"] == keys["sidecar-v3"]
    assert len(keys["sidecar-v1"]) == 8
    assert found["sidecar-v1"]["sidecar.consistency_weight"] == "50.0"
    assert found["sidecar-v2"]["sidecar.force_weight"] == "10.0"
    # v3 is the defaults written out: both params files hold exactly its values.
    for place, path in PARAMS.items():
        sidecar = load_params(path).sidecar
        for key, value in found["sidecar-v3"].items():
            field = key.removeprefix("sidecar.")
            assert str(getattr(sidecar, field)) == value, (place, key)
        for values in found.values():
            check_overrides([f"{k}={v}" for k, v in values.items()], path, tmp_path)


def test_a_preset_that_leaves_out_a_key_is_found():
    text = (
        "<!-- real -->\n```bash\n"
        "dvc exp run --queue -n sidecar-v1 -S sidecar.force_weight=0.0 -S sidecar.consistency=mse\n"
        "dvc exp run --queue -n sidecar-v2 -S sidecar.force_weight=10.0\n```\n"
    )
    found = presets(text)
    assert set(found["sidecar-v1"]) != set(found["sidecar-v2"])
