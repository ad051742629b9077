"""Fixtures of the shared-code tests: a small real filesystem."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MiB tmpfs at tmp_path/fs (needs root and mount); skipped where it cannot be made."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small filesystem")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def fill_up():
    """fill_up(folder, leave_bytes=0): a file taking all the free space there but about that."""

    def fill(folder: Path, leave_bytes: int = 0) -> Path:
        filler = folder / "filler"
        page = os.statvfs(folder).f_frsize
        free_pages = shutil.disk_usage(folder).free // page
        filler.write_bytes(b"\0" * (free_pages - -(-leave_bytes // page)) * page)
        return filler

    return fill
