"""Students, losses and checkpoints: shapes, parameter counts, frozen table, round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.common.checkpoints import save_checkpoint
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.losses import cosine_loss, cosine_similarity_rows
from pipeline.concepts.params import RunParams
from pipeline.concepts.students import (
    build_model,
    count_trainable,
    inference_bytes,
    load_student,
)

RUNS = {
    "trainable": RunParams("trainable", embed_dim=4, hidden_dim=8),
    "frozen_mlp": RunParams("frozen_mlp", hidden_dim=8),
    "linear_probe": RunParams("linear_probe"),
}


def table(vocab: int = 20, emb_dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the odd token ids only, so lookups must go through searchsorted."""
    ids = torch.arange(1, vocab, 2)
    return ids, torch.randn(ids.numel(), emb_dim)


def batch(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = ids[torch.tensor([[0, 3, 5], [2, 0, 0], [7, 1, 0]])]  # (3, 3)
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    return tokens, mask


@pytest.mark.parametrize("name", sorted(RUNS))
def test_output_shape_and_dtype(name):
    ids, rows = table()
    model = build_model(
        RUNS[name], vocab_size=20, output_dim=5, embedding_token_ids=ids, embedding_rows=rows
    )
    out = model(*batch(ids))
    assert out.shape == (3, 5)
    assert out.dtype == torch.float32


def test_trainable_counts_the_rows_it_holds_not_the_vocabulary():
    ids, rows = table()  # 10 held tokens of a vocabulary of 20
    model = build_model(RUNS["trainable"], 20, 5, ids, rows)
    assert count_trainable(model) == 10 * 4 + (4 * 8 + 8) + (8 * 5 + 5)
    assert model.embedding.weight.shape == (10, 4)
    # Seed 000's e=32,h=128 on Qwen3's 151,669-token vocabulary (D=1024) held 5.0M values;
    # over the same 10 used tokens it holds 10 rows whatever the vocabulary.
    e32_h128 = build_model(
        RunParams("trainable", embed_dim=32, hidden_dim=128), 151_669, 1024, ids, rows
    )
    assert count_trainable(e32_h128) == 10 * 32 + 32 * 128 + 128 + 128 * 1024 + 1024


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (RunParams("frozen_mlp", hidden_dim=64), 132_160),
        (RunParams("frozen_mlp", hidden_dim=128), 263_296),
        (RunParams("frozen_mlp", hidden_dim=256), 525_568),
        (RunParams("linear_probe"), 1_049_600),
    ],
)
def test_frozen_counts_reproduce_seed_table(run, expected):
    # The head's size is independent of how many table rows there are: keep 3.
    ids, rows = torch.tensor([1, 5, 9]), torch.randn(3, 1024)
    model = build_model(run, 151_936, 1024, ids, rows)
    hidden = run.hidden_dim
    if hidden is None:
        formula = 1024 * 1024 + 1024
    else:
        formula = 1024 * hidden + hidden + hidden * 1024 + 1024
    assert count_trainable(model) == formula == expected


@pytest.mark.parametrize("name", ["frozen_mlp", "linear_probe"])
def test_frozen_table_gets_no_gradient_and_stays_put(name):
    ids, rows = table()
    model = build_model(RUNS[name], 20, 5, ids, rows)
    before = model.rows.clone()
    assert not any(p.data_ptr() == model.rows.data_ptr() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    loss = cosine_loss(model(*batch(ids)), torch.randn(3, 5))
    loss.backward()
    optimizer.step()
    assert model.rows.grad is None and not model.rows.requires_grad
    assert torch.equal(model.rows, before)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_mean_pool_ignores_padding(name):
    ids, rows = table()
    model = build_model(RUNS[name], 20, 5, ids, rows).eval()
    tokens, mask = batch(ids)
    # Four more padded columns holding ids that are absent from the table (even) or present.
    extra = torch.tensor([[2, 4, 6, 8]] * 3)
    padded_tokens = torch.cat([tokens, extra], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded_tokens, padded_mask), model(tokens, mask))
        # A concept's output does not depend on its batch-mates' lengths either.
        torch.testing.assert_close(model(tokens[1:2, :1], mask[1:2, :1]), model(tokens, mask)[1:2])


def test_frozen_lookup_matches_table_rows():
    ids, rows = table()
    model = build_model(RUNS["linear_probe"], 20, 5, ids, rows)
    tokens = torch.tensor([[ids[2], ids[4]]])
    expected = model.head(rows[[2, 4]].mean(0, keepdim=True))
    torch.testing.assert_close(model(tokens, torch.ones(1, 2, dtype=torch.bool)), expected)


def test_token_missing_from_table_is_a_clear_error():
    ids, rows = table()
    model = build_model(RUNS["frozen_mlp"], 20, 5, ids, rows)
    with pytest.raises(ValueError, match=r"token ids \[4\] are not in the student's embedding"):
        model(torch.tensor([[1, 4]]), torch.tensor([[True, True]]))


def test_cosine_loss_values():
    v = torch.tensor([[1.0, 2.0, -0.5]])
    w = torch.tensor([[2.0, -1.0, 0.0]])  # orthogonal to v
    assert cosine_loss(v, 3 * v).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(v, w).item() == pytest.approx(1.0, abs=1e-6)
    assert cosine_loss(v, -v).item() == pytest.approx(2.0, abs=1e-6)
    pair = cosine_similarity_rows(torch.cat([v, v]), torch.cat([v, w]))
    torch.testing.assert_close(pair, torch.tensor([1.0, 0.0]))
    assert torch.isfinite(cosine_loss(torch.zeros(1, 3), v))


def test_cosine_loss_gradient_is_analytic():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    cosine_loss(pred, target).backward()
    # d/dp (1 - mean_i cos_i) = -(1/B) (t / (|p||t|) - cos * p / |p|^2) per row.
    p, t = pred.detach(), target
    pn, tn = p.norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
    cos = (p * t).sum(1, keepdim=True) / (pn * tn)
    analytic = -(t / (pn * tn) - cos * p / pn**2) / p.shape[0]
    torch.testing.assert_close(pred.grad, analytic)
    assert torch.autograd.gradcheck(lambda x: cosine_loss(x, target), (pred,))


def fitted_config(directions: DirectionSet, run: RunParams, model) -> dict:
    embedding_dim = directions.embedding_rows.shape[1]
    return {
        "run": "r",
        "approach": run.approach,
        "embed_dim": run.embed_dim,
        "hidden_dim": run.hidden_dim,
        "vocab_size": directions.vocab_size,
        "output_dim": directions.dim,
        "embedding_dim": embedding_dim,
        "layer": directions.layer,
        "trainable_params": count_trainable(model),
        "held_tokens": directions.embedding_token_ids.numel(),
    }


@pytest.mark.parametrize("name", sorted(RUNS))
def test_checkpoint_round_trip(name, direction_set, tmp_path):
    directions = DirectionSet(direction_set, layer=2)
    run = RUNS[name]
    model = build_model(
        run,
        directions.vocab_size,
        directions.dim,
        directions.embedding_token_ids,
        directions.embedding_rows,
    )
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), fitted_config(directions, run, model))

    loaded, config = load_student(tmp_path / "ckpt", directions)
    assert not loaded.training and config["approach"] == name
    tokens, mask = directions.concept_tokens(torch.arange(20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, mask), model(tokens, mask), rtol=0, atol=0)
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    if name == "trainable":  # its weights and its remap: the tokens the concepts use
        assert torch.equal(saved.pop("token_ids"), directions.embedding_token_ids)
    assert sum(t.numel() for t in saved.values()) == count_trainable(model)
    assert not {"rows", "token_ids"} & set(saved)


def test_load_student_errors_name_the_file(direction_set, tmp_path):
    directions = DirectionSet(direction_set, layer=2)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_student(tmp_path / "none", directions)
    run = RUNS["frozen_mlp"]
    model = build_model(
        run,
        directions.vocab_size,
        directions.dim,
        directions.embedding_token_ids,
        directions.embedding_rows,
    )
    config = fitted_config(directions, run, model)
    save_checkpoint(tmp_path / "layer", model.state_dict(), {**config, "layer": 7})
    with pytest.raises(ValueError, match=r"config.json: layer=7"):
        load_student(tmp_path / "layer", directions)
    save_checkpoint(tmp_path / "shape", model.state_dict(), {**config, "hidden_dim": 9})
    with pytest.raises(ValueError, match="model.safetensors"):
        load_student(tmp_path / "shape", directions)
    (tmp_path / "shape" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_student(tmp_path / "shape", directions)
    (tmp_path / "shape" / "config.json").write_text(json.dumps({"approach": "trainable"}))
    with pytest.raises(ValueError, match="config.json: missing keys"):
        load_student(tmp_path / "shape", directions)


def test_inference_bytes_counts_full_table_for_frozen():
    # Seed 000's "600MB*": 151,936 x 1024 float32 rows, plus the head.
    frozen = inference_bytes("frozen_mlp", 525_568, vocab_size=151_936, embedding_dim=1024)
    assert frozen == (525_568 + 151_936 * 1024) * 4
    assert 600e6 < frozen < 630e6
    assert inference_bytes("linear_probe", 10, 100, 8) == (10 + 800) * 4
    # A trainable student carries its weights (held rows + head) and its int64 remap.
    assert inference_bytes("trainable", 1000, 151_669, 1024, held_tokens=7) == 1000 * 4 + 7 * 8
    with pytest.raises(ValueError, match="needs its held_tokens"):
        inference_bytes("trainable", 1000, 151_669, 1024)
