"""The tiny profile, end to end through real DVC, without touching tracked files.

The project's files are copied into a workspace (default `build/demo`, git-ignored)
with `profiles/tiny.yaml` as its `params.yaml`; `dvc repro` runs there, so the
DVC cache makes a second `make demo` nearly instant and the user's own
`params.yaml`, `dvc.lock` and `metrics/` stay as they are.

    python -m pipeline.cli demo            # what `make demo` runs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

ROOT = Path(__file__).resolve().parent.parent
PROFILE = Path("profiles/tiny.yaml")
# What the DAG needs when the project is not a git checkout.
FALLBACK_FILES = ("dvc.yaml", "pyproject.toml", ".dvc/config", ".dvcignore")
FALLBACK_DIRS = ("pipeline", "profiles")


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
    for rel in project_files(root):
        target = workspace / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    shutil.copy2(root / profile, workspace / "params.yaml")
    if not (workspace / ".git").exists():
        git = ["git", "-c", "user.name=demo", "-c", "user.email=demo@localhost"]
        subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
        subprocess.run(git + ["add", "-A"], cwd=workspace, check=True)
        subprocess.run(git + ["commit", "-q", "-m", "tiny profile"], cwd=workspace, check=True)
    return workspace


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
TABLES = ("comparison.md", "sidecar.md", "sae.md", "steering.md", "summary.md")


def run_demo(workspace: Path) -> str:
    prepare_workspace(workspace)
    subprocess.run(["dvc", "repro"], cwd=workspace, env=offline_env(), check=True)
    metrics = workspace / "metrics"
    return "\n\n".join(
        f"## metrics/{name}\n\n{(metrics / name).read_text().strip()}"
        for name in TABLES
        if (metrics / name).exists()
    )


def command(
    workspace: Annotated[Path, typer.Option(help="Where the tiny-profile copy runs.")] = Path(
        "build/demo"
    ),
) -> None:
    """Run the whole DAG offline on the tiny profile through `dvc repro`; print the tables."""
    typer.echo(run_demo(workspace))
