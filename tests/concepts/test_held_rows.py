"""The trainable student holds only the rows of the tokens its concepts use (issue 14):
the same init and training as the full-vocabulary table it replaced, its remap in the
checkpoint, checkpoints that disagree with the directions set refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bench.bench_distill import FullTableMLP  # today's student before issue 14, verbatim
from pipeline.common.checkpoints import save_checkpoint
from pipeline.concepts import distill
from pipeline.concepts.comparison import Rests, Row, TeacherFacts, comparison_table
from pipeline.concepts.evaluate import predict
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import RunParams, TrainParams
from pipeline.concepts.students import (
    INIT_CHUNK_ROWS,
    build_model,
    held_normal_rows,
    load_student,
)
from pipeline.concepts.training import fit
from tests.conftest import build_params, make_direction_set

VOCAB = 400
RUN = RunParams("trainable", embed_dim=6, hidden_dim=12)
TRAIN = TrainParams(layer=2, epochs=4, batch_size=16, lr=0.01, weight_decay=0.1, buffer_rows=64)


@pytest.fixture
def sparse_set(tmp_path) -> DirectionSet:
    """240 concepts over a 400-token vocabulary: about 280 tokens used, token 0 never."""
    return DirectionSet(make_direction_set(tmp_path / "dirs", vocab_size=VOCAB), layer=2)


def held(data: DirectionSet, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    ids, rows = data.embedding_token_ids, data.embedding_rows
    return build_model(RUN, data.vocab_size, data.dim, ids, rows)


def full(data: DirectionSet, seed: int = 0) -> FullTableMLP:
    torch.manual_seed(seed)
    return FullTableMLP(data.vocab_size, RUN.embed_dim, RUN.hidden_dim, data.dim)


# (vocab, dim): a size no multiple of 16, one below 16 values, several chunks plus a
# remainder shorter than a chunk, Qwen3's vocabulary at seed 000's e=32.
@pytest.mark.parametrize(
    ("vocab", "dim"), [(37, 5), (3, 3), (3 * INIT_CHUNK_ROWS + 5, 3), (151_936, 32)]
)
def test_held_rows_are_the_full_tables_init_and_leave_the_generator_as_it_does(vocab, dim):
    gen = torch.Generator().manual_seed(vocab)
    ids = torch.unique(torch.randint(0, vocab, (min(vocab, 50),), generator=gen))
    ids = torch.unique(torch.cat([ids, torch.tensor([0, vocab - 1])]))  # both ends too
    torch.manual_seed(7)
    table = nn.Embedding(vocab, dim).weight.detach()
    after_table = torch.rand(4)
    torch.manual_seed(7)
    rows = held_normal_rows(vocab, dim, ids)
    assert torch.equal(rows, table[ids])  # bit for bit
    assert torch.equal(torch.rand(4), after_table)


def test_chunks_off_the_16_value_grid_would_draw_other_values():
    # Why the chunks are multiples of 16 values: 4095 x 3 = 12,285 values is not, and
    # torch redraws the last 16 of such a chunk, so the rows after it come out different.
    vocab, dim = 2 * 4095 + 20, 3
    torch.manual_seed(7)
    table = nn.Embedding(vocab, dim).weight.detach()
    torch.manual_seed(7)
    chunks = [torch.empty(4095, dim).normal_(), torch.empty(vocab - 4095, dim).normal_()]
    off_grid = torch.cat(chunks)
    assert torch.equal(off_grid[:4089], table[:4089])  # up to the redrawn last 16 values
    assert not torch.equal(off_grid, table)


def test_token_ids_outside_the_vocabulary_are_named():
    with pytest.raises(ValueError, match=r"token ids 3\.\.12 fall outside the vocabulary of 10"):
        held_normal_rows(10, 4, torch.tensor([3, 12]))


def test_held_student_starts_and_trains_as_todays_full_table(sparse_set):
    data = sparse_set
    used = data.embedding_token_ids
    assert 0 < used.numel() < VOCAB and int(used[0]) > 0  # rows the full table holds unread
    new, old = held(data), full(data)
    assert new.embedding.weight.shape == (used.numel(), RUN.embed_dim)
    assert torch.equal(new.embedding.weight, old.embedding.weight[used])
    for (name, a), (_, b) in zip(
        new.head.named_parameters(), old.head.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name

    new_fit, old_fit = fit(new, data, TRAIN, seed=0), fit(old, data, TRAIN, seed=0)
    assert new_fit.best_epoch == old_fit.best_epoch
    for new_row, old_row in zip(new_fit.curves, old_fit.curves, strict=True):
        assert new_row == pytest.approx(old_row, rel=1e-5, abs=1e-6)
    # AdamW with weight decay moved every held row as it moved the same row of the table.
    torch.testing.assert_close(new.embedding.weight, old.embedding.weight[used])
    ids = torch.arange(data.num_concepts)
    torch.testing.assert_close(predict(new, data, ids), predict(old, data, ids))
    # The training changed the rows: equality above is not the init surviving untouched.
    assert (new.embedding.weight - old_fit.state_dict["embedding.weight"][used]).abs().max() < 1e-5
    start = full(data).embedding.weight[used]
    assert (new.embedding.weight - start).abs().max() > 1e-2


def test_another_init_breaks_the_equality(sparse_set):
    # The must-fail twin of the test above: rows drawn for another seed train elsewhere.
    data = sparse_set
    new, old = held(data, seed=1), full(data, seed=0)
    fit(new, data, TRAIN, seed=0)
    fit(old, data, TRAIN, seed=0)
    ids = torch.arange(data.num_concepts)
    assert (predict(new, data, ids) - predict(old, data, ids)).abs().max() > 1e-2


def test_stage_saves_the_remap_and_reports_what_the_student_holds(sparse_set, tmp_path):
    params = build_params(
        directions={"layers": [2]},
        distill={
            "train": {"layer": 2, "epochs": 2, "batch_size": 32, "buffer_rows": 64},
            "runs": {"tiny": {"approach": "trainable", "embed_dim": 6, "hidden_dim": 12}},
        },
    )
    out = tmp_path / "tiny"
    distill.run(params, "tiny", sparse_set.folder, out, tmp_path / "live")
    seed_dir = out / "seeds" / "0"
    config = json.loads((seed_dir / "config.json").read_text())
    used = sparse_set.embedding_token_ids.numel()
    head = 6 * 12 + 12 + 12 * 16 + 16
    assert config["held_tokens"] == used
    assert config["trainable_params"] == used * 6 + head
    assert config["inference_bytes"] == (used * 6 + head) * 4 + used * 8
    weights = load_file(str(seed_dir / "model.safetensors"))
    assert torch.equal(weights["token_ids"], sparse_set.embedding_token_ids)
    assert weights["embedding.weight"].shape == (used, 6)
    model, _ = load_student(seed_dir, sparse_set)
    assert torch.equal(model.token_ids, sparse_set.embedding_token_ids)


def saved_student(data: DirectionSet, folder) -> dict:
    model = held(data)
    config = {
        "run": "r",
        "approach": "trainable",
        "embed_dim": RUN.embed_dim,
        "hidden_dim": RUN.hidden_dim,
        "vocab_size": data.vocab_size,
        "output_dim": data.dim,
        "embedding_dim": data.embedding_rows.shape[1],
        "layer": data.layer,
        "held_tokens": data.embedding_token_ids.numel(),
    }
    save_checkpoint(folder, model.state_dict(), config)
    return config


def test_checkpoint_whose_remap_disagrees_is_refused_naming_the_file(sparse_set, tmp_path):
    folder = tmp_path / "ckpt"
    config = saved_student(sparse_set, folder)
    load_student(folder, sparse_set)  # as saved: loads
    weights = load_file(str(folder / "model.safetensors"))
    unused = int(torch.isin(torch.arange(1, VOCAB), weights["token_ids"], invert=True).nonzero()[0])
    weights["token_ids"][0] = unused + 1  # another token, same count
    weights["token_ids"] = weights["token_ids"].sort().values
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors: its token remap"):
        load_student(folder, sparse_set)
    save_checkpoint(tmp_path / "count", held(sparse_set).state_dict(), config | {"held_tokens": 9})
    with pytest.raises(ValueError, match=r"count/config\.json: held_tokens=9, but the directions"):
        load_student(tmp_path / "count", sparse_set)


def test_checkpoint_from_before_the_held_rows_is_refused_with_what_to_do(sparse_set, tmp_path):
    # What the distill stage wrote before issue 14: the whole table, no remap, no count.
    config = saved_student(sparse_set, tmp_path / "new")
    del config["held_tokens"]
    save_checkpoint(tmp_path / "old", full(sparse_set).state_dict(), config)
    with pytest.raises(
        ValueError, match=r"old/config\.json: a trainable student written before .* re-train it"
    ):
        load_student(tmp_path / "old", sparse_set)


def test_table_says_what_the_trainable_rows_hold():
    teacher = TeacherFacts("m", 6, "mean", "")
    metrics = {"trainable_params": 1234, "inference_bytes": 5000, "test_cos": 0.1}
    row = Row("t", "Trainable e=4,h=8", metrics | {"held_tokens": 2002}, approach="trainable")
    rests = Rests({"train": 40, "val": 40, "test": 40, "test_seen": 40, "test_unseen": 40}, 30)
    text = comparison_table([row], (1,), "text", teacher, rests)
    assert "one row per token the concepts use (2,002 tokens, all splits)" in text
    assert "| 1.23K " in text and "| 5KB " in text
    # Without a trainable row (here: one without held_tokens) the note is absent.
    plain = Row("f", "Frozen+MLP h=8", metrics, frozen=True, approach="frozen_mlp")
    assert "one row per token" not in comparison_table([plain], (1,), "text", teacher, rests)
