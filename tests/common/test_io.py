"""Atomic text / JSON writers: exact bytes, parent folders, no half file on failure."""

from __future__ import annotations

import errno
import os

import pytest

from pipeline.common.io import atomic_path, write_json, write_text


def test_writers_create_folders_and_write_exact_bytes(tmp_path):
    write_text(tmp_path / "a" / "t.md", "| x |\n–\n")
    assert (tmp_path / "a" / "t.md").read_bytes() == "| x |\n–\n".encode()
    write_json(tmp_path / "b" / "m.json", {"b": 1, "a": [0.5]})
    assert (tmp_path / "b" / "m.json").read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 1\n}\n'
    write_json(tmp_path / "b" / "m.json", {"b": 1, "a": 2}, sort_keys=False)
    assert (tmp_path / "b" / "m.json").read_text() == '{\n  "b": 1,\n  "a": 2\n}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["a", "b", "t.md", "m.json"])


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_names_the_file_it_was_writing(tmp_path):
    target = tmp_path / "record.json"
    with pytest.raises(OSError) as raised:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            # A write or close on a full disk fails without naming its file.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError) as raised:
        with atomic_path(target) as tmp:
            open(tmp_path / "missing" / "x")
    assert raised.value.filename == str(tmp_path / "missing" / "x")
