"""The corpus stage: deterministic chunks of the EOS-joined token stream, every source, errors."""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.common.shards import Manifest, read_shard
from pipeline.common.teacher import TeacherLoadError
from pipeline.inputs import corpus
from pipeline.inputs.params import CorpusParams
from pipeline.inputs.text_chunks import (
    CORPUS,
    CorpusChunks,
    CorpusSourceError,
    builtin_documents,
    cut_chunks,
    load_tokenizer,
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
