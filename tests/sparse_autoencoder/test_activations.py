"""The token-level activations stage: known answers against transformers, padding, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from pipeline.common.shards import Manifest, layer_key, read_shard, shard_name, write_shard
from pipeline.inputs.text_chunks import CORPUS, CorpusChunks
from pipeline.inputs.tiny_models import build_tiny
from pipeline.sparse_autoencoder import activations
from pipeline.sparse_autoencoder.layout import ACTIVATIONS
from pipeline.sparse_autoencoder.params import ActivationsParams
from pipeline.sparse_autoencoder.sources import (
    SINK_NORM_RATIO,
    StartRows,
    TokenSource,
    held_out,
    open_source,
)
from tests.conftest import build_params
from tests.tiny_teachers import tiny_teacher

TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
    "Rivers run to the sea and the mountains stand still under a blue sky every morning. "
    "People read books, write letters and talk about the weather over a cup of tea."
)


@pytest.fixture(scope="module")
def tiny_llama():
    """The reference model and its tokenizer; the stage loads the same teacher by path."""
    return build_tiny("llama")


def make_corpus(
    folder: Path,
    tokenizer,
    num_chunks: int = 6,
    chunk_tokens: int = 12,
    shard_rows: int = 4,
    pad_to: list[int] | None = None,
    model: str | None = None,
    start_tokens: int | None = None,
    tokens_at: dict[tuple[int, int], int] | None = None,
) -> Path:
    """A corpus folder (layout: inputs/text_chunks.py): chunks of TEXT's tokens, ids 100, 103, ...

    `pad_to[i]`: keep that many real tokens in chunk i and right-pad the rest;
    `tokens_at[(i, p)]`: the token at position p of chunk i.
    """
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= num_chunks * chunk_tokens, "TEXT is too short for this corpus"
    tokens = torch.tensor(ids[: num_chunks * chunk_tokens]).reshape(num_chunks, chunk_tokens)
    extra = {
        "model": model or tiny_teacher("llama"),
        "revision": "main",
        "chunk_tokens": chunk_tokens,
        "block_chunks": 1,
    }
    for (row, position), token in (tokens_at or {}).items():
        tokens[row, position] = token
    if start_tokens is not None:  # as the corpus stage records them: ids off chunk 0
        extra["start_tokens"] = start_tokens
        extra["start_token_ids"] = tokens[0, :start_tokens].tolist()
    if pad_to is not None:
        for row, keep in enumerate(pad_to):
            tokens[row, keep:] = tokenizer.pad_token_id
        extra["pad_token_id"] = tokenizer.pad_token_id
    chunk_id = 100 + 3 * torch.arange(num_chunks)
    folder.mkdir(parents=True, exist_ok=True)
    records = [
        write_shard(
            folder / shard_name(i),
            {
                "chunk_id": chunk_id[start : start + shard_rows],
                "token_ids": tokens[start : start + shard_rows],
            },
        )
        for i, start in enumerate(range(0, num_chunks, shard_rows))
    ]
    extra |= {"num_chunks": num_chunks, "source": "test"}
    Manifest(kind=CORPUS, params={}, shards=records, extra=extra).save(folder)
    return folder


def params(**overrides) -> ActivationsParams:
    base = dict(
        model=tiny_teacher("llama"),
        layers=(2, 4),
        positions="all",
        compute_dtype="float32",
        storage_dtype="float32",
        shard_rows=20,
        batch_size=2,
        device="cpu",
    )
    return ActivationsParams(**(base | overrides))


def stored(folder: Path) -> dict[str, torch.Tensor]:
    manifest = Manifest.load(folder, kind=ACTIVATIONS)
    shards = [read_shard(folder, record) for record in manifest.shards]
    return {name: torch.cat([s[name] for s in shards]) for name in shards[0]}


def reference(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None], output_hidden_states=True).hidden_states[layer][0]


def test_all_tokens_equal_transformers_hidden_states(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    corpus = make_corpus(tmp_path / "corpus", tokenizer)
    stats = activations.run(params(), corpus, tmp_path / "acts")
    rows = stored(tmp_path / "acts")
    manifest = Manifest.load(tmp_path / "acts")
    # 20 target rows / 12 tokens per chunk -> 1 chunk per shard, 6 shards, 72 rows.
    assert stats["rows"] == 72 and stats["shards"] == 6 == len(manifest.shards)
    assert manifest.extra["layers"] == [2, 4] and manifest.extra["hidden_size"] == 64
    assert rows["chunk_id"].tolist() == [c for c in range(100, 118, 3) for _ in range(12)]
    assert rows["position"].tolist() == list(range(12)) * 6
    chunks = CorpusChunks(corpus).read(0, 6)
    assert torch.equal(rows["token_id"], chunks.flatten())
    for layer in (2, 4):  # 4 is the last layer: HF reports it after the final norm
        expected = torch.cat([reference(model, chunk, layer) for chunk in chunks])
        got = rows[layer_key(layer)]
        assert got.dtype == torch.float32 and got.shape == (72, 64)
        assert torch.allclose(got, expected, atol=1e-5), f"layer {layer}"


def test_last_non_padding_token_per_chunk(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    corpus = make_corpus(tmp_path / "corpus", tokenizer, num_chunks=4, pad_to=[12, 5, 9, 0])
    activations.run(params(positions="last", layers=(3,)), corpus, tmp_path / "acts")
    rows = stored(tmp_path / "acts")
    # The all-padding chunk (103 + 6 = 109) has no row; the others their last real token.
    assert rows["chunk_id"].tolist() == [100, 103, 106]
    assert rows["position"].tolist() == [11, 4, 8]
    chunks = CorpusChunks(corpus).read(0, 3)
    for i, keep in enumerate((12, 5, 9)):
        expected = reference(model, chunks[i, :keep], 3)[-1]
        assert torch.allclose(rows["layer_3"][i], expected, atol=1e-5)
        assert rows["token_id"][i] == chunks[i, keep - 1]


def test_all_positions_skip_padding(tmp_path, tiny_llama):
    _, tokenizer = tiny_llama
    corpus = make_corpus(tmp_path / "corpus", tokenizer, num_chunks=2, pad_to=[12, 7])
    run = params(layers=(1,), max_chunks=2, storage_dtype="bfloat16")
    activations.run(run, corpus, tmp_path / "acts")
    rows = stored(tmp_path / "acts")
    assert rows["layer_1"].dtype == torch.bfloat16
    assert TokenSource(tmp_path / "acts", layer=1).sample("all", 100)[1].dtype == torch.float32
    assert rows["position"].tolist() == list(range(12)) + list(range(7))
    assert not (rows["token_id"] == tokenizer.pad_token_id).any()


def test_max_chunks_and_token_source_reads_rows_with_items(tmp_path, tiny_llama):
    _, tokenizer = tiny_llama
    corpus = make_corpus(tmp_path / "corpus", tokenizer)
    activations.run(params(max_chunks=4, shard_rows=30), corpus, tmp_path / "acts")
    source = TokenSource(tmp_path / "acts", layer=2, eval_fraction=0.5)
    assert [r.rows for r in source.manifest.shards] == [24, 24]  # 2 chunks per shard
    items, x, is_eval = (torch.cat(parts) for parts in zip(*source.shards("all"), strict=True))
    assert items[:, 0].unique().tolist() == [100, 103, 106, 109]
    assert torch.equal(x, stored(tmp_path / "acts")["layer_2"])
    assert torch.equal(is_eval, held_out(items[:, 0], 0.5, 1))
    # All tokens of a chunk fall on the same side of the split.
    for chunk in items[:, 0].unique():
        assert is_eval[items[:, 0] == chunk].unique().numel() == 1
    source.attach_texts(corpus, tokenizer)
    span = source.describe(torch.tensor([[103, 5]]), context_tokens=3)[0]
    chunk = CorpusChunks(corpus).tokens_of(torch.tensor([103]))[103].tolist()
    expected = (
        tokenizer.decode(chunk[2:5])
        + "[["
        + tokenizer.decode(chunk[5:6])
        + "]]"
        + tokenizer.decode(chunk[6:7])
    )
    assert span == expected


def test_held_out_share_is_stable_and_close_to_the_fraction():
    ids = torch.arange(20_000)
    share = held_out(ids, 0.1, 1).double().mean().item()
    assert 0.09 < share < 0.11
    assert torch.equal(held_out(ids[::7], 0.1, 1), held_out(ids, 0.1, 1)[::7])


def test_bad_input_is_named_before_anything_is_written(tmp_path, tiny_llama):
    _, tokenizer = tiny_llama
    corpus = make_corpus(tmp_path / "corpus", tokenizer, model="other/model")
    with pytest.raises(ValueError, match=r"activations.model='.*tiny-llama'.*'other/model'"):
        activations.run(params(), corpus, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        activations.run(params(), tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_params_validate_and_check_the_corpus_model():
    with pytest.raises(ValueError, match="activations.layers is empty"):
        ActivationsParams(layers=())
    with pytest.raises(ValueError, match="activations.max_chunks must be > 0"):
        ActivationsParams(max_chunks=0)
    with pytest.raises(ValueError, match="activations.positions must be one of"):
        build_params(activations={"positions": "first"})
    with pytest.raises(ValueError, match=r"activations.model='other/model' differs from corpus"):
        build_params(
            corpus={"model": tiny_teacher("llama")},
            trajectories={"model": tiny_teacher("llama")},
            activations={"model": "other/model"},
        )
    params = build_params(
        corpus={"model": tiny_teacher("llama")},
        trajectories={"model": tiny_teacher("llama")},
        activations={"model": tiny_teacher("llama")},
    )
    assert params.activations.model == params.corpus.model == tiny_teacher("llama")


def test_command_line(tmp_path, tiny_llama):
    _, tokenizer = tiny_llama
    corpus = make_corpus(tmp_path / "corpus", tokenizer, num_chunks=2)
    params_file = tmp_path / "params.yaml"
    section = {
        "model": tiny_teacher("llama"),
        "layers": [1],
        "compute_dtype": "float32",
        "device": "cpu",
    }
    # The token-level sections must agree on the model that tokenizes the corpus.
    same = {"model": tiny_teacher("llama")}
    sections = {"corpus": same, "trajectories": same, "activations": section, "sae": {"layer": 1}}
    params_file.write_text(yaml.safe_dump(sections))
    app = typer.Typer()
    app.command()(activations.command)
    args = ["--params", str(params_file), "--corpus", str(corpus), "--out", str(tmp_path / "a")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # positions: all (the default): every token of the 2 chunks of 12.
    assert Manifest.load(tmp_path / "a").rows == 2 * 12


def test_start_rows_are_the_first_positions_start_tokens_and_sinks_by_norm():
    ratio = SINK_NORM_RATIO
    assert StartRows.of({}, keep=False) == StartRows(1, (), ratio)  # before the key: position 0
    assert StartRows.of({"start_tokens": 0}, keep=False) == StartRows(1, (), ratio)
    extra = {"start_tokens": 2, "start_token_ids": [0, 5]}
    assert StartRows.of(extra, keep=False) == StartRows(2, (0, 5), ratio)
    assert StartRows.of(extra, keep=True) == StartRows()
    x = torch.ones(6, 4)
    x[4] *= 4.9  # below 5x the median norm: an ordinary row
    x[5] *= 5.1  # above: a sink wherever it sits
    position, token_id = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([7, 3, 7, 4, 4, 4])
    assert StartRows(1, (7,), 5.0).kept(position, token_id, x).tolist() == [
        *(False, True, False, True, True, False)
    ]
    assert StartRows(1, (7,)).kept(position, token_id, x)[5]  # no norm rule
    assert StartRows().kept(position, token_id, x).all()


def test_token_source_leaves_out_start_rows_and_counts_them(tmp_path, tiny_llama):
    _, tokenizer = tiny_llama
    start = tokenizer.eos_token_id
    # Every chunk starts with the start token; in chunk 2 a document starts at position 6.
    tokens_at = {(chunk, 0): start for chunk in range(4)} | {(2, 6): start}
    corpus = make_corpus(tmp_path / "c", tokenizer, 4, start_tokens=1, tokens_at=tokens_at)
    activations.run(params(layers=(1,), shard_rows=30), corpus, tmp_path / "acts")
    extra = Manifest.load(tmp_path / "acts").extra
    assert extra["start_tokens"] == 1 and extra["start_token_ids"] == [start]
    source = open_source(tmp_path / "acts", 1, eval_fraction=0.5)
    items, x, is_eval = (torch.cat(parts) for parts in zip(*source.shards("all"), strict=True))
    assert source.start == StartRows(1, (start,), SINK_NORM_RATIO)
    assert items.shape[0] == 4 * 11 - 1  # a random teacher puts no sink by norm
    assert (2, 6) not in {tuple(item) for item in items.tolist()} and items[:, 1].min() == 1
    rows = stored(tmp_path / "acts")
    assert torch.equal(x, rows["layer_1"][(rows["position"] > 0) & (rows["token_id"] != start)])
    held = {int(c) for c in items[is_eval, 0].unique()}
    dropped_eval = sum(1 + (chunk == 106) for chunk in held)  # chunk 2 has id 106
    assert source.dropped_rows == {"train": 5 - dropped_eval, "eval": dropped_eval}
    list(source.shards("all"))  # a second pass counts nothing twice
    assert sum(source.dropped_rows.values()) == 5
    kept = open_source(tmp_path / "acts", 1, eval_fraction=0.5, keep_start_rows=True)
    assert sum(r.shape[0] for r, _, _ in kept.shards("all")) == 48
    assert kept.dropped_rows == {"train": 0, "eval": 0}
