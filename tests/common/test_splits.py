"""Split hashes: known assignments pinned for each use, so a refactor never moves an item.

The values were computed with the code before the hashes were unified (chunks: since
held-out text is split by corpus block); a change here means existing concepts,
questions or chunks changed split.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.common.splits import SplitFractions, is_heldout, split_of, unit_hash
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.words import concepts_table
from pipeline.sparse_autoencoder.sources import held_out
from pipeline.steering_vectors.questions import DEFAULT_FRACTIONS, EVAL_HALVES


def test_unit_hash_is_sha256_of_the_key_as_a_fraction():
    assert unit_hash("\0the") == 0.18388537081254813
    assert unit_hash("s1\0house") == 0.8558867813857701
    assert unit_hash("chunk:0") == 0.09340158992112914
    assert unit_hash("chunk:3") == 0.988997854260537
    assert unit_hash("block:0") == 0.6274948714199634


def test_concept_splits_are_pinned_and_depend_on_the_salt():
    params = WordlistParams(source="wordfreq", num_concepts=5)
    words = ["the", "seven", "stone", "light", "house"]
    table = concepts_table([(w, rank) for rank, w in enumerate(words)], [(None, None)] * 5, params)
    assert table.column("split").to_pylist() == ["train", "val", "val", "test", "train"]
    assert params.split_by == "text"  # the default: these pinned values are today's splits
    salted = [split_of(w, SplitFractions(), salt="s1") for w in ("house", "river", "seven")]
    assert salted == ["test", "val", "train"]


def test_question_splits_are_pinned():
    keys = ["3 plus 4", "9 minus 2", '{"a": 1}', "2 times 6"]
    assert [split_of(k, EVAL_HALVES) for k in keys] == ["val", "test", "val", "test"]
    assert [split_of(k, DEFAULT_FRACTIONS) for k in keys] == ["train"] * 4
    assert split_of("seven", DEFAULT_FRACTIONS) == "val"


def test_sidecar_held_out_chunks_are_pinned_by_block():
    assert unit_hash("block:1") < 0.25 <= unit_hash("block:0")
    chunks = is_heldout(torch.arange(40), 0.25, 2).nonzero().flatten().tolist()
    assert chunks == [2, 3, 8, 9, 12, 13, 14, 15, 18, 19, 32, 33, 36, 37]
    ids = torch.tensor([0, 1, 100, 12345, 999999])
    assert is_heldout(ids, 0.5, 3).tolist() == [False, False, True, True, False]
    assert is_heldout(ids, 0.5, 3).tolist() == [unit_hash(f"block:{i // 3}") < 0.5 for i in ids]


def test_sae_held_out_chunks_are_pinned_by_block():
    # A multiplicative hash of its own, of the block id.
    chunks = held_out(torch.arange(40), 0.25, 2).nonzero().flatten().tolist()
    assert chunks == [0, 1, 4, 5, 10, 11, 20, 21, 26, 27, 36, 37]
    # One chunk per block: the chunk ids themselves, as before blocks.
    assert held_out(torch.arange(20), 0.25, 1).nonzero().flatten().tolist() == [0, 2, 5, 10, 13, 18]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_held_out_fractions_at_the_ends(fraction):
    ids = torch.arange(50)
    assert int(is_heldout(ids, fraction, 4).sum()) == 50 * fraction
    assert int(held_out(ids, fraction, 4).sum()) == 50 * fraction
