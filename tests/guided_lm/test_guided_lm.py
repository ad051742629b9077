"""Guided LM: word finder, held-out split, aux loss, lambda = 0 as the plain LM, params."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.common.splits import is_heldout, unit_hash
from pipeline.guided_lm.data import Occurrences, WordFinder, find_occurrences, held_vocabulary
from pipeline.guided_lm.model import build_aux_map, build_lm, cosine_loss
from pipeline.guided_lm.params import GuidedLmParams
from pipeline.guided_lm.training import Aux, train_lm
from tests.conftest import build_params

SMALL = dict(d_model=32, num_layers=2, num_heads=4, ffn_dim=64, layer=1, steps=6, batch_size=2)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    return AutoTokenizer.from_pretrained(tiny_llama_path)


def test_word_finder_returns_each_concept_words_last_token(tokenizer):
    text = "the cats, and Cat sat on the catalog. cat"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[1:3] == ["Ġc", "ats"]  # "cats" is two tokens: its last one is position 2
    finder = WordFinder(tokenizer, {"cat": 0, "cats": 1, "catalog": 2, "sat": 3})
    found = finder.find(ids)
    positions = {concept: [p for p, c in found if c == concept] for concept in range(4)}
    assert positions[1] == [2]  # multi-token word; "," right after it
    last_cat = [i for i, p in enumerate(pieces) if p == "at"][0]
    assert positions[0] == [last_cat]  # "Cat" lowercased; "cats"/"catalog" are not "cat"
    assert positions[2] == [pieces.index("og")]  # "catalog" ends at "og", before "."
    assert positions[3] == [pieces.index("Ġsat")]
    assert finder.cut == 1  # the trailing "cat" touches the chunk's end: maybe cut, skipped


def test_held_vocabulary_maps_tokens_to_rows_of_the_ids_they_use():
    tokens = torch.tensor([[5, 49000, 5], [7, 5, 49000]])
    vocabulary, compact = held_vocabulary(tokens)
    assert vocabulary.tolist() == [5, 7, 49000]
    assert compact.tolist() == [[0, 2, 0], [1, 0, 2]]
    assert torch.equal(vocabulary[compact], tokens)  # the same targets, renamed


def test_word_finder_on_compact_ids_finds_what_it_finds_on_tokenizer_ids(tokenizer):
    ids = tokenizer.encode("the cats, and Cat sat on the catalog. cat", add_special_tokens=False)
    vocabulary, compact = held_vocabulary(torch.tensor([ids]))
    concepts = {"cat": 0, "cats": 1, "catalog": 2, "sat": 3}
    full = WordFinder(tokenizer, concepts)
    held = WordFinder(tokenizer, concepts, vocabulary)
    assert len(held.surfaces) == vocabulary.numel() < len(full.surfaces)
    assert held.find(compact[0].tolist()) == full.find(ids) != []
    assert full.find(compact[0].tolist()) != full.find(ids)  # compact ids need the vocabulary


def test_occurrences_in_rows_index_the_batch():
    occ = Occurrences(
        torch.tensor([0, 0, 2, 5]), torch.tensor([1, 4, 3, 2]), torch.tensor([7, 8, 9, 6])
    )
    index, found = occ.in_rows(torch.tensor([5, 0]))
    assert index.tolist() == [0, 1, 1] and found.concept.tolist() == [6, 7, 8]
    assert found.position.tolist() == [2, 1, 4]


def test_find_occurrences_rows_ascending(tokenizer):
    ids = tokenizer.encode("a cat sat on a cat mat", add_special_tokens=False)
    finder = WordFinder(tokenizer, {"cat": 0})
    occ = find_occurrences(torch.tensor([ids, ids]), finder)
    assert occ.row.tolist() == [0, 0, 1, 1] and occ.concept.tolist() == [0, 0, 0, 0]


def test_heldout_split_by_block_known_answer():
    held = is_heldout(torch.arange(6), 0.5, 2)
    assert held.tolist() == [unit_hash(f"block:{i // 2}") < 0.5 for i in range(6)]
    assert held.tolist() == [False, False, True, True, False, False]


def test_aux_loss_is_zero_on_a_planted_map():
    torch.manual_seed(0)
    aux = build_aux_map(8, 5, seed=0)
    hidden = torch.randn(20, 8)
    with torch.no_grad():
        target = aux(hidden) * 3.0  # same direction, other scale
    with torch.no_grad():
        assert float(cosine_loss(aux(hidden), target)) == pytest.approx(0.0, abs=1e-6)
        assert float(cosine_loss(aux(hidden), -target)) == pytest.approx(2.0, abs=1e-6)


def _setup(lam: float):
    params = GuidedLmParams(**SMALL)
    tokens = torch.randint(0, 50, (6, 12))
    occ = Occurrences(
        torch.tensor([0, 1, 3, 4]), torch.tensor([3, 5, 7, 2]), torch.tensor([0, 1, 0, 1])
    )
    directions = torch.randn(2, 5)
    lm = build_lm(params, 50, seed=3)
    aux = Aux(build_aux_map(params.d_model, 5, seed=3), occ, directions, params.layer, lam)
    return params, tokens, lm, aux


def _train(params, tokens, lm, aux):
    return train_lm(
        lm, torch.arange(6), tokens, params.steps, params.batch_size, 1e-2, 0.01, 0, aux
    )


def test_lambda_zero_reproduces_the_plain_lm_bit_for_bit():
    torch.manual_seed(11)
    params, tokens, lm, aux = _setup(0.0)
    guided = _train(params, tokens, lm, aux)
    plain_lm = build_lm(params, 50, seed=3)
    plain = _train(params, tokens, plain_lm, None)
    assert guided.supervised > 0  # the aux term was computed, weighted 0
    assert guided.lm_losses == plain.lm_losses
    for (name, a), b in zip(lm.state_dict().items(), plain_lm.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_lambda_above_zero_changes_the_weights():
    torch.manual_seed(11)
    params, tokens, lm, aux = _setup(1.0)
    guided = _train(params, tokens, lm, aux)
    plain_lm = build_lm(params, 50, seed=3)
    plain = _train(params, tokens, plain_lm, None)
    assert guided.lm_losses[0] == plain.lm_losses[0]  # same init, same first batch
    assert guided.lm_losses != plain.lm_losses
    embed = "model.embed_tokens.weight"
    assert not torch.equal(lm.state_dict()[embed], plain_lm.state_dict()[embed])


def test_same_seed_same_weights_other_seed_not():
    params = GuidedLmParams(**SMALL)
    a, b, c = (build_lm(params, 50, seed=s).lm_head.weight for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"lambdas": [0.0, -0.1]}, "guided_lm.lambdas holds -0.1"),
        ({"lambdas": [0.1]}, "guided_lm.lambdas=[0.1] has no 0.0"),
        ({"lambdas": [0.0]}, "guided_lm.lambdas=[0.0] has no lambda > 0"),
        ({"corpus_fractions": [0.5, 1.5]}, "guided_lm.corpus_fractions holds 1.5"),
        ({"corpus_fractions": [0.0, 1.0]}, "guided_lm.corpus_fractions holds 0.0"),
        ({"layer": 9}, "guided_lm.layer=9"),
    ],
)
def test_bad_params_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        build_params(guided_lm={**SMALL, **override})


def test_good_params_load_with_distill_alongside():
    params = build_params(guided_lm=SMALL)
    assert params.guided_lm.sizes == (0.25, 0.5, 1.0) and params.distill.train.layer >= 0
