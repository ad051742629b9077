"""Held-out text by document: blocks of chunks that no document spans, and both consumers'
held-out selections keyed by block."""

from __future__ import annotations

import json
import random

import pytest
import torch

from pipeline.common.shards import Manifest, read_shard
from pipeline.common.splits import is_heldout, unit_hash
from pipeline.inputs import corpus
from pipeline.inputs.params import CorpusParams
from pipeline.inputs.text_chunks import (
    CORPUS,
    ChunkStats,
    CorpusChunks,
    block_ids,
    builtin_documents,
    load_tokenizer,
    pack_blocks,
)
from pipeline.sparse_autoencoder.sources import held_out

EOS = 0


def docs_of_lengths(lengths: list[int]) -> list[list[int]]:
    """Document d holds tokens 100 * (d + 1) + k, so every token names its document."""
    return [[100 * (d + 1) + k for k in range(1, n + 1)] for d, n in enumerate(lengths)]


def owner(token: int) -> int | None:
    return None if token == EOS else token // 100 - 1


def chunk_documents(chunks) -> list[set[int]]:
    """The documents whose (non-EOS) tokens each chunk holds."""
    return [{owner(t) for t in c.tokens if t != EOS} for c in chunks]


def test_hand_built_blocks_skip_the_rest_of_the_document_at_each_seam():
    # With EOS: 4, 9, 0 (empty), 3, 2, 7, 5 tokens; chunks of 5, blocks of 2 chunks.
    docs = docs_of_lengths([3, 8, 0, 2, 1, 6, 4])
    stats = ChunkStats()
    chunks = list(pack_blocks(docs, EOS, 5, 100, 2, stats))
    assert [c.tokens for c in chunks] == [
        [101, 102, 103, EOS, 201],
        [202, 203, 204, 205, 206],  # seam: 207, 208, EOS of document 1 skipped
        [401, 402, EOS, 501, EOS],  # block 1 starts at document 3 (document 2 is empty)
        [601, 602, 603, 604, 605],  # seam: 606, EOS of document 5 skipped
        [701, 702, 703, 704, EOS],
    ]
    assert [(c.first_document, c.last_document) for c in chunks] == [
        (0, 1), (1, 1), (3, 4), (5, 5), (6, 6)
    ]  # fmt: skip
    assert stats == ChunkStats(
        documents=7, empty_documents=1, parts=6, tokens_read=30, tokens_used=25, blocks=3,
        seam_skipped_tokens=5, unused_tokens=0,
    )  # fmt: skip


def test_a_document_longer_than_a_block_is_cut_at_the_seam_and_max_chunks_stops_reading():
    docs = docs_of_lengths([23, 2, 30])
    stats = ChunkStats()
    chunks = list(pack_blocks(iter(docs), EOS, 5, 3, 2, stats))
    assert [c.tokens[0] for c in chunks] == [101, 106, 201]
    # Document 0 (24 tokens): 10 in block 0, 14 skipped; document 2: 2 in chunk 2, the
    # rest (29 tokens) past max_chunks is unused, not skipped at a seam.
    assert stats.seam_skipped_tokens == 14 and stats.unused_tokens == 29 and stats.blocks == 2
    assert stats.documents == 3 and stats.tokens_read == 24 + 3 + 31


def test_start_ids_lead_every_chunk_and_long_documents_are_cut_into_whole_parts():
    # Chunks of 5 = start id 9 + 4 text tokens; documents cut into parts of 3 tokens.
    docs = docs_of_lengths([3, 8, 0, 2, 1, 6, 4])
    stats = ChunkStats()
    chunks = list(pack_blocks(docs, EOS, 5, 100, 2, stats, start=[9], max_document_tokens=3))
    assert [c.tokens for c in chunks] == [
        [9, 101, 102, 103, EOS],
        [9, 201, 202, 203, 204],  # seam: 205, 206, the rest of part [204, 205, 206], skipped
        [9, 207, 208, EOS, 401],  # block 1 starts at a part's start: no EOS between parts
        [9, 402, EOS, 501, EOS],  # seam: part [501, EOS] ended with the block
        [9, 601, 602, 603, 604],
        [9, 605, 606, EOS, 701],  # seam: 702, 703 skipped
    ]  # the last part, [704, EOS], fills no chunk
    assert [(c.first_document, c.last_document) for c in chunks] == [
        (0, 0), (1, 1), (1, 3), (3, 4), (5, 5), (5, 6)
    ]  # fmt: skip
    assert stats == ChunkStats(
        documents=7, empty_documents=1, parts=12, tokens_read=30, tokens_used=24, blocks=3,
        seam_skipped_tokens=4, unused_tokens=2,
    )  # fmt: skip
    assert stats.used_fraction == 24 / 30


def test_a_chunk_needs_room_for_text_after_its_start_ids():
    with pytest.raises(ValueError, match="chunk_tokens must exceed the 1 start token"):
        list(pack_blocks(docs_of_lengths([3]), EOS, 1, 10, 2, start=[9]))


@pytest.mark.parametrize(("block_chunks", "max_tokens"), [(2, 5), (3, 7), (4, 12)])
def test_no_part_has_tokens_in_two_blocks(block_chunks, max_tokens):
    rng = random.Random(max_tokens)
    docs = docs_of_lengths([rng.randint(0, 60) for _ in range(200)])
    stats = ChunkStats()
    chunks = list(pack_blocks(docs, EOS, 8, 10_000, block_chunks, stats, [9], max_tokens))
    assert all(c.tokens[0] == 9 and 9 not in c.tokens[1:] for c in chunks)
    homes: dict[tuple[int, int], set[int]] = {}
    for number, chunk in enumerate(chunks):
        for token in chunk.tokens[1:]:
            if token != EOS:  # token 100 (d + 1) + k is in part (k - 1) // max_tokens of d
                part = (owner(token), (token % 100 - 1) // max_tokens)
                homes.setdefault(part, set()).add(number // block_chunks)
    assert all(len(blocks) == 1 for blocks in homes.values())
    assert stats.parts > stats.documents - stats.empty_documents
    assert stats.tokens_used == 7 * len(chunks)
    assert stats.tokens_read == stats.tokens_used + stats.seam_skipped_tokens + stats.unused_tokens


@pytest.mark.parametrize("block_chunks", [1, 3, 4])
def test_every_document_lies_in_exactly_one_block_and_the_skip_count_is_exact(block_chunks):
    rng = random.Random(block_chunks)
    docs = docs_of_lengths([rng.randint(0, 40) for _ in range(300)])
    stats = ChunkStats()
    chunks = list(pack_blocks(docs, EOS, 7, 10_000, block_chunks, stats))
    blocks = block_ids(torch.arange(len(chunks)), block_chunks).tolist()
    homes: dict[int, set[int]] = {}
    for block, documents in zip(blocks, chunk_documents(chunks), strict=True):
        for d in documents:
            homes.setdefault(d, set()).add(block)
    assert all(len(b) == 1 for b in homes.values())
    # Each block is the stream of its documents from the first one's start, cut short:
    # what its documents hold beyond the block's tokens is exactly what was skipped.
    skipped = 0
    for block in range(stats.blocks):
        members = [c for c, b in zip(chunks, blocks, strict=True) if b == block]
        stream = [t for c in members for t in c.tokens]
        first, last = members[0].first_document, members[-1].last_document
        full = [t for d in range(first, last + 1) if docs[d] for t in [*docs[d], EOS]]
        assert full[: len(stream)] == stream
        if len(members) == block_chunks:  # a seam follows (a short last block: none)
            skipped += len(full) - len(stream)
    assert skipped == stats.seam_skipped_tokens > 0
    total = sum(len(d) + 1 for d in docs if d)
    assert total == len(chunks) * 7 + stats.seam_skipped_tokens + stats.unused_tokens


def old_sidecar_heldout(chunk_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """The per-chunk hash before this change, for the test that must fail."""
    return torch.tensor([unit_hash(f"chunk:{int(i)}") < fraction for i in chunk_ids])


def old_sae_held_out(chunk_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    return ((chunk_ids * 2_654_435_761) % 2**32).double() / 2**32 < fraction


def documents_on_both_sides(chunks, heldout: torch.Tensor) -> set[int]:
    documents = chunk_documents(chunks)
    train = set().union(*(d for d, h in zip(documents, heldout.tolist(), strict=True) if not h))
    held = set().union(*(d for d, h in zip(documents, heldout.tolist(), strict=True) if h))
    return train & held


def test_no_document_is_on_both_sides_of_either_consumers_split():
    rng = random.Random(0)
    docs = docs_of_lengths([rng.randint(10, 60) for _ in range(400)])
    chunks = list(pack_blocks(docs, EOS, 16, 10_000, 4, ChunkStats()))
    ids = torch.arange(len(chunks))
    for heldout, fraction in ((is_heldout(ids, 0.2, 4), 0.2), (held_out(ids, 0.1, 4), 0.1)):
        assert 0 < int(heldout.sum()) < len(ids)
        assert documents_on_both_sides(chunks, heldout) == set()
        # The share of blocks held out is near `fraction`: blocks are the split units.
        blocks = block_ids(ids, 4)
        share = len(set(blocks[heldout].tolist())) / len(set(blocks.tolist()))
        assert abs(share - fraction) < 0.08
    # The per-chunk hashes used before: the same input puts documents on both sides.
    assert len(documents_on_both_sides(chunks, old_sidecar_heldout(ids, 0.2))) > 10
    assert len(documents_on_both_sides(chunks, old_sae_held_out(ids, 0.1))) > 5


@pytest.fixture
def tiny_params(tiny_llama_path):
    return CorpusParams(
        source="builtin", model=tiny_llama_path, chunk_tokens=21, max_chunks=13, block_chunks=3,
        shard_rows=4,
    )  # fmt: skip


def test_the_corpus_stage_stores_blocks_documents_and_counts(
    tmp_path, tiny_params, tiny_llama_path
):
    stats = corpus.run(tiny_params, tmp_path / "out", tmp_path / "metrics" / "corpus.json")
    manifest = Manifest.load(tmp_path / "out", kind=CORPUS)
    shards = [read_shard(tmp_path / "out", r) for r in manifest.shards]
    first = torch.cat([s["first_document"] for s in shards])
    last = torch.cat([s["last_document"] for s in shards])
    tokens = torch.cat([s["token_ids"] for s in shards])
    blocks = block_ids(torch.arange(13), 3)
    for block in range(5):  # blocks 0..3 of 3 chunks, block 4 of one
        span = blocks == block
        later = blocks > block
        assert not later.any() or int(first[later].min()) > int(last[span].max())
    assert manifest.extra["block_chunks"] == 3 and manifest.extra["num_blocks"] == 5
    written = json.loads((tmp_path / "metrics" / "corpus.json").read_text())
    assert written == {k: stats[k] for k in written} and written["chunks"] == 13
    assert written["blocks"] == 5 and written["seam_skipped_tokens"] > 0
    # Each block starts at its first document's first token.
    tokenizer = load_tokenizer(tiny_llama_path, "main")
    docs = [d for _, d in zip(range(int(last.max()) + 1), builtin_documents(seed=0), strict=False)]
    for block in range(5):
        row = 3 * block
        start = tokenizer(docs[int(first[row])], add_special_tokens=False)["input_ids"]
        assert tokens[row, 0] == tokenizer.convert_tokens_to_ids("<|endoftext|>")  # auto
        assert tokens[row, 1 : 1 + len(start)].tolist() == start[:20]
    assert CorpusChunks(tmp_path / "out").block_chunks == 3


def test_a_corpus_written_before_blocks_is_refused_with_one_line(tmp_path, tiny_params):
    corpus.run(tiny_params, tmp_path / "out")
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["extra"]["block_chunks"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as err:
        CorpusChunks(tmp_path / "out")
    assert "\n" not in str(err.value)
    assert str(err.value).endswith("re-run the corpus stage (dvc repro corpus)")
    assert "has no block_chunks" in str(err.value)


def test_block_chunks_must_be_positive():
    with pytest.raises(ValueError, match="corpus.block_chunks must be > 0, got 0"):
        CorpusParams(block_chunks=0)


GEOMETRY = dict(window_size=6, num_windows=2, num_queries=4)  # chunks of 12 + 4 + 1 tokens


@pytest.fixture(scope="module")
def blocked_corpus(tmp_path_factory, tiny_llama_path):
    out = tmp_path_factory.mktemp("blocked") / "corpus"
    params = CorpusParams(source="builtin", model=tiny_llama_path, chunk_tokens=17,
                          max_chunks=12, block_chunks=3, shard_rows=4)  # fmt: skip
    corpus.run(params, out)
    return out


def strip_block_chunks(folder) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["extra"]["block_chunks"]
    path.write_text(json.dumps(manifest))


def test_trajectories_carry_block_chunks_and_the_sidecar_splits_by_block(
    blocked_corpus, tmp_path, tiny_llama_path
):
    from pipeline.kv_sidecar import trajectories
    from pipeline.kv_sidecar.params import TrajectoriesParams
    from pipeline.kv_sidecar.trajectory_set import TrajectorySet

    params = TrajectoriesParams(model=tiny_llama_path, layers=(0,), max_chunks=12,
                                compute_dtype="float32", storage_dtype="float32",
                                shard_rows=4, batch_size=4, **GEOMETRY)  # fmt: skip
    trajectories.run(params, blocked_corpus, tmp_path / "traj")
    data = TrajectorySet(tmp_path / "traj", layer=0, eval_fraction=0.5)
    assert data.block_chunks == 3
    held = is_heldout(torch.arange(12), 0.5, 3)
    assert data.chunk_counts()["heldout"] == int(held.sum())
    seen = torch.cat([b.chunk_id for b in data.batches("heldout", 64, 64, shuffle=False)])
    assert set(seen.tolist()) == set(held.nonzero().flatten().tolist())
    strip_block_chunks(tmp_path / "traj")
    with pytest.raises(ValueError, match="no block_chunks.*re-run the corpus and trajectories"):
        TrajectorySet(tmp_path / "traj", layer=0, eval_fraction=0.5)


def test_activations_carry_block_chunks_and_the_sae_splits_by_block(
    blocked_corpus, tmp_path, tiny_llama_path
):
    from pipeline.sparse_autoencoder import activations
    from pipeline.sparse_autoencoder.params import ActivationsParams
    from pipeline.sparse_autoencoder.sources import TokenSource

    params = ActivationsParams(model=tiny_llama_path, layers=(2,), positions="all",
                               compute_dtype="float32", storage_dtype="float32",
                               shard_rows=64, batch_size=4, device="cpu")  # fmt: skip
    activations.run(params, blocked_corpus, tmp_path / "acts")
    source = TokenSource(tmp_path / "acts", layer=2, eval_fraction=0.3)
    assert source.block_chunks == 3
    items, _, is_eval = (torch.cat(parts) for parts in zip(*source.shards("all"), strict=True))
    assert torch.equal(is_eval, held_out(items[:, 0], 0.3, 3))
    assert 0 < int(is_eval.sum()) < len(is_eval)
    strip_block_chunks(tmp_path / "acts")
    with pytest.raises(ValueError, match="no block_chunks.*re-run the corpus and activations"):
        TokenSource(tmp_path / "acts", layer=2, eval_fraction=0.3)


def test_shuffled_parts_are_every_part_once_in_a_seeded_order_each_ended_by_eos():
    # Parts of 3 (EOS included): doc 0 -> [101 102 103] [EOS]; doc 1 -> [201 202 203]
    # [204 EOS]; doc 2 -> [301 EOS]. Chunks of 2 tokens, no start, blocks of 1 chunk.
    docs = docs_of_lengths([3, 4, 1])
    stats = ChunkStats()
    chunks = list(pack_blocks(docs, EOS, 2, 100, 1, stats, max_document_tokens=3, shuffle_seed=0))
    tokens = [t for c in chunks for t in c.tokens]
    # Every text token appears once at most (seams skip the rest of a part), never twice.
    text = [t for t in tokens if t != EOS]
    assert len(text) == len(set(text))
    order = [owner(c.tokens[0]) for c in chunks if c.tokens[0] != EOS]
    unshuffled = list(pack_blocks(docs, EOS, 2, 100, 1, ChunkStats(), max_document_tokens=3))
    assert [c.tokens for c in chunks] != [c.tokens for c in unshuffled]
    again = pack_blocks(docs, EOS, 2, 100, 1, ChunkStats(), max_document_tokens=3, shuffle_seed=0)
    assert [c.tokens for c in again] == [c.tokens for c in chunks]
    assert stats.documents == 3 and stats.parts == 5 and set(order) <= {0, 1, 2}
    # A part cut mid-document ([101 102 103], [201 202 203]) gets an EOS: 5 parts, 2 added.
    assert stats.tokens_read == 3 + 1 + 3 + 2 + 2 + 2
    assert stats.tokens_read == stats.tokens_used + stats.seam_skipped_tokens + stats.unused_tokens


def test_shuffle_needs_a_source_read_whole():
    with pytest.raises(ValueError, match="corpus.shuffle_parts is true but corpus.source="):
        CorpusParams(source="builtin", shuffle_parts=True)
