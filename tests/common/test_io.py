"""Atomic text / JSON / CSV writers: exact bytes, parent folders, no half file on failure."""

from __future__ import annotations

import errno
import os

import pytest

from pipeline.common.io import atomic_path, write_csv, write_json, write_text


def test_writers_create_folders_and_write_exact_bytes(tmp_path):
    write_text(tmp_path / "a" / "t.md", "| x |\n–\n")
    assert (tmp_path / "a" / "t.md").read_bytes() == "| x |\n–\n".encode()
    write_json(tmp_path / "b" / "m.json", {"b": 1, "a": [0.5]})
    assert (tmp_path / "b" / "m.json").read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 1\n}\n'
    write_json(tmp_path / "b" / "m.json", {"b": 1, "a": 2}, sort_keys=False)
    assert (tmp_path / "b" / "m.json").read_text() == '{\n  "b": 1,\n  "a": 2\n}\n'
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    write_csv(tmp_path / "c" / "curves.csv", rows)
    assert (tmp_path / "c" / "curves.csv").read_text() == "step,loss\n1,0.5\n2,0.25\n"
    write_csv(tmp_path / "c" / "curves.csv", rows, fields=("loss", "step"))
    assert (tmp_path / "c" / "curves.csv").read_text() == "loss,step\n0.5,1\n0.25,2\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["a", "b", "c", "t.md", "m.json", "curves.csv"]
    )


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "curves.csv"
    write_text(target, "old\n")
    with pytest.raises(ValueError, match="not in fieldnames"):
        write_csv(target, [{"step": 1}, {"step": 2, "extra": 3}])
    assert target.read_text() == "old\n"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.csv"]


def test_csv_without_rows_needs_field_names(tmp_path):
    with pytest.raises(ValueError, match="no rows and no field names"):
        write_csv(tmp_path / "empty.csv", [])
    write_csv(tmp_path / "empty.csv", [], fields=("epoch", "val_cos"))
    assert (tmp_path / "empty.csv").read_text() == "epoch,val_cos\n"


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
