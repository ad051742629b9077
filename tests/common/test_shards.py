"""Manifests are verified, not trusted: file names, and rows / dtypes / shapes against headers.

Every forged manifest here is written by the project's own writer (`write_shard`,
`Manifest.save`, the corpus stage) and then edited, as a fault or an attacker would.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.common.shards import (
    MANIFEST,
    Manifest,
    ShardRecord,
    read_header,
    read_shard,
    shard_name,
    write_shard,
)
from pipeline.concepts.layout import DirectionSet
from pipeline.inputs import corpus
from pipeline.inputs.params import CorpusParams
from pipeline.inputs.text_chunks import CorpusChunks
from pipeline.kv_sidecar import trajectories
from pipeline.kv_sidecar.params import TrajectoriesParams
from pipeline.sparse_autoencoder import activations
from pipeline.sparse_autoencoder.params import ActivationsParams
from tests.conftest import make_direction_set
from tests.tiny_teachers import tiny_teacher


def make_artifact(folder: Path) -> Path:
    """Two shards of 4 and 2 rows (x float32 (R, 3), id int64 (R,)) and a side file."""
    folder.mkdir(parents=True)
    x, ids = torch.arange(18, dtype=torch.float32).reshape(6, 3), torch.arange(6)
    shards = [
        write_shard(folder / shard_name(0), {"x": x[:4], "id": ids[:4]}),
        write_shard(folder / shard_name(1), {"x": x[4:], "id": ids[4:]}),
    ]
    side = write_shard(
        folder / "table.safetensors", {"a": torch.ones(5), "b": torch.ones(2)}, rowwise=False
    )
    Manifest(kind="test", params={}, shards=shards, files={"table": side}).save(folder)
    return folder


def edit(folder: Path, change: Callable[[dict], None]) -> Path:
    """Apply `change` to the manifest's JSON in place."""
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def rehash(folder: Path, index: int) -> None:
    """Make the manifest's sha256 of shard `index` match whatever the file now holds."""
    digest = hashlib.sha256((folder / shard_name(index)).read_bytes()).hexdigest()
    edit(folder, lambda m: m["shards"][index].update(sha256=digest))


@pytest.fixture
def artifact(tmp_path) -> Path:
    return make_artifact(tmp_path / "art")


def test_a_genuine_manifest_loads_and_its_shards_read(artifact):
    manifest = Manifest.load(artifact, kind="test")
    assert [r.rows for r in manifest.shards] == [4, 2] and manifest.rows == 6
    assert manifest.files["table"].rows == 0  # written rowwise=False
    got = torch.cat([read_shard(artifact, r)["x"] for r in manifest.shards])
    assert torch.equal(got, torch.arange(18, dtype=torch.float32).reshape(6, 3))
    assert read_header(artifact / shard_name(1)) == manifest.shards[1].tensors
    # A side file whose tensors share a length keeps rows 0 when written rowwise=False.
    assert Manifest.load(make_direction_set(artifact.parent / "d")).files["tokens"].rows == 0


ESCAPES = {
    "parent": ("../../../../evil/evil.safetensors", "climbs out of the folder with '..'"),
    "absolute": ("EVIL_ABSOLUTE", "is an absolute path"),
    "subfolder": ("sub/shard-00000.safetensors", "holds a path separator"),
    "backslash": ("sub\\shard-00000.safetensors", "holds a path separator"),
    "dotdot": ("..", "climbs out of the folder"),
    "hidden": (".shard-00000.safetensors", "is hidden"),
    "empty": ("", "is not a file name"),
}


@pytest.mark.parametrize("case", ESCAPES)
def test_a_file_outside_the_folder_is_refused_at_load(tmp_path, case):
    name, why = ESCAPES[case]
    outside = tmp_path / "evil" / "evil.safetensors"  # a genuine shard, outside the artifact
    artifact = make_artifact(tmp_path / "a" / "b" / "c" / "art")
    outside.parent.mkdir()
    outside.write_bytes((artifact / shard_name(0)).read_bytes())
    name = str(outside) if name == "EVIL_ABSOLUTE" else name
    manifest = edit(artifact, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(ValueError, match=rf"{manifest}: shards\[0\]: .*{why}"):
        Manifest.load(artifact)


@pytest.mark.parametrize("key", ["../table", "sub/table", ".table"])
def test_a_side_file_key_or_name_that_is_not_a_plain_name_is_refused(artifact, key):
    edit(artifact, lambda m: m["files"].update({key: m["files"]["table"]}))
    with pytest.raises(ValueError, match=rf"manifest.json: files\['{key}'\]: '{key}'"):
        Manifest.load(artifact)
    edit(artifact, lambda m: m["files"].pop(key))
    edit(artifact, lambda m: m["files"]["table"].update(file=key + ".safetensors"))
    with pytest.raises(ValueError, match=r"manifest.json: files\['table'\]: '"):
        Manifest.load(artifact)


FORGERIES = {
    "rows halved": (lambda s: s.update(rows=2), "rows = 2, its safetensors header says 4"),
    "rows zero": (lambda s: s.update(rows=0), "rows = 0, its safetensors header says 4"),
    "shape": (
        lambda s: s["tensors"]["x"].update(shape=[4, 2]),
        r"tensor 'x' shape = \[4, 2\], its safetensors header says \[4, 3\]",
    ),
    "rows and shapes together": (
        lambda s: (s.update(rows=2), s["tensors"]["x"].update(shape=[2, 3])),
        r"tensor 'x' shape = \[2, 3\], its safetensors header says \[4, 3\]",
    ),
    "dtype": (
        lambda s: s["tensors"]["id"].update(dtype="int32"),
        "tensor 'id' dtype = int32, its safetensors header says int64",
    ),
    "a tensor dropped": (
        lambda s: s["tensors"].pop("id"),
        r"tensors = \['x'\], its safetensors header says \['id', 'x'\]",
    ),
}


@pytest.mark.parametrize("case", FORGERIES)
def test_numbers_that_disagree_with_the_header_are_refused_naming_file_field_and_values(
    artifact, case
):
    change, message = FORGERIES[case]
    manifest = edit(artifact, lambda m: change(m["shards"][0]))
    shard = artifact / shard_name(0)
    with pytest.raises(ValueError, match=rf"shard {shard}: {manifest} says {message}"):
        Manifest.load(artifact)


def test_a_forged_file_with_a_matching_sha256_is_caught_by_its_header(artifact):
    # The forger swaps shard 1 for a 3-row file and fixes the sha256, not the rows:
    # only the header check sees it.
    ids = torch.arange(3)
    write_shard(artifact / shard_name(1), {"x": torch.zeros(3, 3), "id": ids})
    rehash(artifact, 1)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: .* says tensor 'id' shape"):
        Manifest.load(artifact)


def test_side_file_rows_are_checked_too(artifact):
    edit(artifact, lambda m: m["files"]["table"].update(rows=7))
    with pytest.raises(ValueError, match=r"table.safetensors: .* rows = 7, .* header says 0"):
        Manifest.load(artifact)


def test_two_entries_naming_one_file_and_a_missing_file_are_refused(artifact):
    edit(artifact, lambda m: m["shards"].append(m["shards"][0]))
    with pytest.raises(ValueError, match=r"shards\[0\] and shards\[2\] name shard-00000"):
        Manifest.load(artifact)
    edit(artifact, lambda m: m["shards"].pop())
    (artifact / shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001.safetensors is listed in .*manifest"):
        Manifest.load(artifact)


def with_header(blob: bytes, length: int | None = None, header: bytes | None = None) -> bytes:
    """`blob` (a safetensors file) with its header length and/or header bytes replaced."""
    old = struct.unpack("<Q", blob[:8])[0]
    header = blob[8 : 8 + old] if header is None else header
    return struct.pack("<Q", len(header) if length is None else length) + header + blob[8 + old :]


BAD_HEADERS = {
    "2^62 bytes": (lambda b: with_header(b, length=2**62), "header claims 4611686018427387904"),
    "longer than its file": (lambda b: with_header(b, length=len(b)), "header claims"),
    "not JSON": (lambda b: with_header(b, header=b"{not json" + b" " * 80), "not valid JSON"),
    "not UTF-8": (lambda b: with_header(b, header=b"\xff" * 64), "not valid JSON"),
    "a list": (lambda b: with_header(b, header=b"[1, 2]"), "not a JSON object"),
    "data cut short": (lambda b: b[:-4], "its tensors fill"),
    "repeated field": (
        lambda b: with_header(
            b, header=b'{"x":{"dtype":"F32","dtype":"F32","shape":[4,3],"data_offsets":[0,48]}}'
        ),
        "a key repeats",
    ),
    "shorter than a length": (lambda b: b[:5], "header claims"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_a_broken_header_is_refused_naming_the_file_not_by_a_safetensors_traceback(artifact, case):
    corrupt, message = BAD_HEADERS[case]
    shard = artifact / shard_name(0)
    record = Manifest.load(artifact).shards[0]
    shard.write_bytes(corrupt(shard.read_bytes()))
    rehash(artifact, 0)  # a forger fixes the sha256: the header check must still refuse
    expected = rf"shard {shard} is not a readable safetensors file: .*{message}"
    with pytest.raises(ValueError, match=expected):
        Manifest.load(artifact)
    with pytest.raises(ValueError, match=expected):  # a record held from before the change
        read_shard(artifact, record, verify=False)


def test_read_shard_refuses_a_record_naming_a_file_outside_its_folder(artifact):
    record = Manifest.load(artifact).shards[0]
    forged = ShardRecord("../art/" + record.file, record.sha256, record.rows, record.tensors)
    with pytest.raises(ValueError, match="climbs out of the folder"):
        read_shard(artifact, forged)


def test_readers_use_only_verified_numbers(tmp_path):
    folder = make_direction_set(tmp_path / "directions", num_concepts=100, shard_rows=64)
    assert DirectionSet(folder, 2).load_split("train")[0].numel() > 0
    edit(folder, lambda m: m["shards"][1].update(rows=64))  # 36 rows in the file
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: .* rows = 64, .* says 36"):
        DirectionSet(folder, 2)


# --- the extraction stages on a corpus whose manifest was edited ---

GEOMETRY = dict(window_size=6, num_windows=2, num_queries=4)  # chunks of 12 + 4 + 1 tokens


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    # No start token: 17 = GEOMETRY's 2 x 6 + 4 + 1, without a dense prefix.
    params = CorpusParams(source="builtin", model=tiny_teacher("llama"), chunk_tokens=17,
                          max_chunks=8, shard_rows=4, start_token="none")  # fmt: skip
    corpus.run(params, out)
    return out


def stage_params(stage: str):
    if stage == "trajectories":
        return TrajectoriesParams(model=tiny_teacher("llama"), layers=(0,), max_chunks=8,
                                  compute_dtype="float32", storage_dtype="float32",
                                  shard_rows=4, batch_size=4, **GEOMETRY)  # fmt: skip
    return ActivationsParams(model=tiny_teacher("llama"), layers=(2,), positions="last",
                             compute_dtype="float32", storage_dtype="float32", shard_rows=4,
                             batch_size=4, device="cpu")  # fmt: skip


STAGES = {"trajectories": trajectories.run, "activations": activations.run}


@pytest.mark.parametrize("stage", STAGES)
def test_extraction_stages_refuse_a_corpus_whose_rows_were_halved(corpus_dir, tmp_path, stage):
    run = STAGES[stage]
    assert run(stage_params(stage), corpus_dir, tmp_path / "genuine")["chunks"] == 8
    forged = tmp_path / "corpus"
    forged.mkdir()
    for path in corpus_dir.iterdir():
        (forged / path.name).write_bytes(path.read_bytes())
    manifest = edit(forged, lambda m: m["shards"][0].update(rows=2))
    shard = forged / shard_name(0)
    with pytest.raises(ValueError, match=rf"shard {shard}: {manifest} says rows = 2, .* says 4"):
        run(stage_params(stage), forged, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corpus_chunk_tokens_must_match_its_token_ids(corpus_dir, tmp_path):
    forged = tmp_path / "corpus"
    forged.mkdir()
    for path in corpus_dir.iterdir():
        (forged / path.name).write_bytes(path.read_bytes())
    assert CorpusChunks(forged).chunk_tokens == 17
    edit(forged, lambda m: m["extra"].update(chunk_tokens=18))
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: token_ids is \[4, 17\]"):
        CorpusChunks(forged)
