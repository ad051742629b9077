"""Issue 13's students: the character-level student (UTF-8 bytes, no tokenizer), the
distilled-embedding student (rank-e SVD of the teacher table), the bag-of-characters
baseline, their sizes, checkpoints, params errors and summary entries."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from sklearn.feature_extraction.text import CountVectorizer

from pipeline.common.checkpoints import save_checkpoint
from pipeline.common.params import load_params
from pipeline.common.summary import check_entry, summary_table
from pipeline.concepts import distill, evaluate
from pipeline.concepts.comparison import (
    CHAR_BASELINE,
    Rests,
    Row,
    TeacherFacts,
    char_entry,
    comparison_table,
    distilled_entry,
)
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import RunParams
from pipeline.concepts.scores import char_ngram_ridge_predict, mean_cosine
from pipeline.concepts.students import (
    build_model,
    count_trainable,
    distill_table,
    forward_concepts,
    inference_bytes,
    load_student,
)
from tests.conftest import build_params, make_direction_set
from tests.tables import squeeze

CHAR = RunParams("char_cnn", embed_dim=4, channels=6, kernel_size=3, hidden_dim=8)
DISTILLED = RunParams("distilled", embed_dim=3, hidden_dim=8)
WORDS = ["café", "walk", "walked", "jump", "a", "naïve", "über", "x-ray"] * 5  # 40 concepts
TEACHER = TeacherFacts("synthetic", 2, "last", "")
COUNTS = {"train": 70, "val": 40, "test": 40, "test_seen": 5, "test_unseen": 35}
RESTS = Rests(COUNTS, min_rows=30)


def build(run: RunParams, data: DirectionSet) -> torch.nn.Module:
    return build_model(
        run, data.vocab_size, data.dim, data.embedding_token_ids, data.embedding_rows
    )


def two_vocabularies(tmp_path) -> tuple[DirectionSet, DirectionSet]:
    """The same words in two directions folders with different token tables."""
    common = {"num_concepts": len(WORDS), "texts": WORDS, "layer": 2}
    a = make_direction_set(tmp_path / "a", vocab_size=50, emb_dim=8, seed=0, **common)
    b = make_direction_set(tmp_path / "b", vocab_size=400, emb_dim=8, seed=1, **common)
    return DirectionSet(a, 2), DirectionSet(b, 2)


def test_char_student_reads_utf8_bytes_not_tokens(tmp_path):
    first, second = two_vocabularies(tmp_path)
    values, mask = first.concept_bytes(torch.tensor([0, 4]))
    # "café" is 5 UTF-8 bytes (é = c3 a9); "a" one; padding is 0 and masked out.
    assert values.tolist() == [[99, 97, 102, 195, 169], [97, 0, 0, 0, 0]]
    assert mask.tolist() == [[True] * 5, [True, False, False, False, False]]
    assert first.concept_texts(torch.tensor([5, 7])) == ["naïve", "x-ray"]
    # No tokenizer anywhere, and the vocabularies differ: the same word, the same output.
    assert not torch.equal(first.flat_tokens, second.flat_tokens)
    torch.manual_seed(0)
    model = build(CHAR, first).eval()
    ids = torch.arange(len(WORDS))
    with torch.no_grad():
        torch.testing.assert_close(
            forward_concepts(model, first, ids), forward_concepts(model, second, ids)
        )
        # A token student with the same seed does see the vocabulary change.
        torch.manual_seed(0)
        token_student = build(RunParams("frozen_mlp", hidden_dim=8), first).eval()
        token_student_b = build(RunParams("frozen_mlp", hidden_dim=8), second).eval()
        token_student_b.head.load_state_dict(token_student.head.state_dict())
        assert not torch.allclose(
            forward_concepts(token_student, first, ids),
            forward_concepts(token_student_b, second, ids),
        )


def test_char_student_output_does_not_depend_on_batch_width(tmp_path):
    first, _ = two_vocabularies(tmp_path)
    model = build(CHAR, first).eval()
    with torch.no_grad():
        alone = forward_concepts(model, first, torch.tensor([4]))  # "a": width 1
        together = forward_concepts(model, first, torch.tensor([2, 4]))  # "walked": width 6
    torch.testing.assert_close(alone, together[1:])
    assert together.shape == (2, first.dim)


def test_forward_concepts_needs_the_student_to_say_what_it_reads(direction_set):
    data = DirectionSet(direction_set, 2)
    with pytest.raises(ValueError, match="Linear reads None; known: \\['tokens', 'bytes'\\]"):
        forward_concepts(torch.nn.Linear(3, 3), data, torch.tensor([0]))


def planted(singular: list[float], rows: int = 12, width: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(width, len(singular), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(singular, dtype=torch.float64)) @ v.T  # (rows, width)


def test_embedding_distillation_recovers_an_exactly_rank_e_table():
    exact = planted([5.0, 4.0, 3.0]).float()  # rank 3
    table, projection = distill_table(exact, 3)
    assert table.shape == (12, 3) and projection.shape == (3, 7)
    torch.testing.assert_close(table @ projection, exact, rtol=0, atol=1e-5)
    # One rank more than e: the best rank-3 fit misses by exactly the 4th singular value
    # (Eckart-Young), so the table is not recovered.
    richer = planted([5.0, 4.0, 3.0, 2.0]).float()
    table, projection = distill_table(richer, 3)
    residual = torch.linalg.matrix_norm(table @ projection - richer)
    assert residual.item() == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="distilled embed_dim=8 exceeds"):
        distill_table(exact, 8)


def test_distilled_student_is_a_frozen_mlp_on_the_reconstructed_rows(direction_set):
    data = DirectionSet(direction_set, 2)
    model = build(RunParams("distilled", embed_dim=8, hidden_dim=8), data).eval()  # e = E
    frozen = build(RunParams("frozen_mlp", hidden_dim=8), data).eval()
    frozen.head.load_state_dict(model.head.state_dict())
    ids = torch.arange(30)
    with torch.no_grad():
        # Full rank: the reconstruction is the teacher table, so the two students agree.
        torch.testing.assert_close(
            forward_concepts(model, data, ids),
            forward_concepts(frozen, data, ids),
            atol=1e-5,
            rtol=0,
        )
    # Only the head trains; the fitted table and projection are buffers.
    assert count_trainable(model) == count_trainable(frozen) == 8 * 8 + 8 + 8 * 16 + 16
    assert {name for name, _ in model.named_buffers()} >= {"table", "projection"}


def test_bag_of_characters_baseline_recovers_a_planted_linear_map():
    gen = torch.Generator().manual_seed(0)
    letters = "abc"

    def words(n: int) -> list[str]:
        lengths = torch.randint(2, 7, (n,), generator=gen).tolist()
        return [
            "".join(letters[i] for i in torch.randint(0, 3, (k,), generator=gen)) for k in lengths
        ]

    texts = {"train": words(300), "val": words(60), "test": words(60)}
    counts = CountVectorizer(analyzer="char_wb", ngram_range=(1, 2), lowercase=False)
    counts.fit(texts["train"])
    weight = torch.randn(len(counts.vocabulary_), 5, generator=gen, dtype=torch.float64)
    target = {
        s: torch.from_numpy(counts.transform(t).toarray()).double() @ weight
        for s, t in texts.items()
    }
    preds, alpha = char_ngram_ridge_predict(
        texts, target["train"], target["val"], (1, 2), (1e-8, 1e3)
    )
    assert alpha == 1e-8  # val picks the penalty that does not shrink the exact map
    torch.testing.assert_close(preds["test"], target["test"], rtol=0, atol=1e-4)
    # A target that is no function of the characters: the same baseline cannot predict it.
    noise = {
        s: torch.randn(len(t), 5, generator=gen, dtype=torch.float64) for s, t in texts.items()
    }
    preds, _ = char_ngram_ridge_predict(texts, noise["train"], noise["val"], (1, 2), (1.0,))
    assert abs(mean_cosine(preds["test"], noise["test"])) < 0.3


def test_inference_bytes_known_answers():
    # Qwen3-0.6B: 151,936 x 1024 table; distilled e=64 + the h=256 head (525,568 params):
    # seed 000's "0.90 with ~10M params instead of the 600MB table" question.
    head = 1024 * 256 + 256 + 256 * 1024 + 1024
    assert head == 525_568
    size = inference_bytes("distilled", head, 151_936, 1024, embed_dim=64)
    assert size == (151_936 * 64 + 64 * 1024 + head) * 4 == 41_260_032
    assert size / 4 / 1e6 == pytest.approx(10.3, abs=0.05)
    assert inference_bytes("distilled", 10, 100, 8, embed_dim=2) == (10 + 200 + 16) * 4
    # The char student carries its own weights only, whatever the vocabulary.
    assert inference_bytes("char_cnn", 1234, 151_936, 1024) == 1234 * 4
    with pytest.raises(ValueError, match="needs its embed_dim"):
        inference_bytes("distilled", 10, 100, 8)


def char_params_count(run: RunParams, output_dim: int) -> int:
    e, c, k, h = run.embed_dim, run.channels, run.kernel_size, run.hidden_dim
    return (
        256 * e
        + (e * c * k + c)
        + (c * c * k + c)
        + (2 * c * h + h)
        + (h * output_dim + output_dim)
    )


def test_char_student_parameter_count():
    model = build_model(CHAR, 50, 16, torch.tensor([1]), torch.zeros(1, 8))
    assert count_trainable(model) == char_params_count(CHAR, 16) == 1024 + 78 + 114 + 104 + 144
    small = RunParams("char_cnn", embed_dim=16, channels=64, kernel_size=3, hidden_dim=256)
    assert char_params_count(small, 384) == 151_296  # char_cnn_c64 on the demo teacher (D=384)


@pytest.mark.parametrize("run", [CHAR, DISTILLED], ids=["char_cnn", "distilled"])
def test_checkpoint_round_trip(run, direction_set, tmp_path):
    data = DirectionSet(direction_set, 2)
    model = build(run, data)
    config = distill.checkpoint_config("r", run, data, model, _fit_result(), build_params())
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), config)
    loaded, read = load_student(tmp_path / "ckpt", data)
    assert not loaded.training and read["approach"] == run.approach
    ids = torch.arange(40)
    with torch.no_grad():
        torch.testing.assert_close(
            forward_concepts(loaded, data, ids), forward_concepts(model, data, ids), rtol=0, atol=0
        )
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    fitted = 0 if run is CHAR else data.embedding_rows.shape[0] * 3 + 3 * 8  # table + projection
    assert sum(t.numel() for t in saved.values()) == count_trainable(model) + fitted
    if run is DISTILLED:
        assert 0 < config["table_cos"] < 1  # rank 3 of a rank-8 table: not exact
        assert config["inference_bytes"] == (count_trainable(model) + 50 * 3 + 3 * 8) * 4
    else:
        assert config["table_cos"] is None and config["channels"] == 6


def _fit_result():
    from pipeline.concepts.training import FitResult

    return FitResult({}, best_epoch=1, best_val_cos=0.5, curves=[])


def test_char_checkpoint_loads_against_another_vocabulary(tmp_path):
    first, second = two_vocabularies(tmp_path)
    model = build(CHAR, first)
    config = distill.checkpoint_config("r", CHAR, first, model, _fit_result(), build_params())
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), config)
    loaded, _ = load_student(tmp_path / "ckpt", second)  # another vocab_size and table
    with torch.no_grad():
        ids = torch.arange(8)
        torch.testing.assert_close(
            forward_concepts(loaded, second, ids), forward_concepts(model.eval(), first, ids)
        )


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (
            {"approach": "distilled", "hidden_dim": 8},
            "distill.runs.bad: approach distilled needs a positive embed_dim, got None",
        ),
        (
            {"approach": "char_cnn", "embed_dim": 4, "channels": 8, "hidden_dim": 8},
            "distill.runs.bad: approach char_cnn needs a positive kernel_size, got None",
        ),
        (
            {"approach": "distilled", "embed_dim": 4, "hidden_dim": 8, "channels": 3},
            "distill.runs.bad: approach distilled takes no channels (got 3)",
        ),
        ({"approach": "gru"}, "distill.runs.bad.approach must be one of"),
    ],
)
def test_bad_run_params_name_the_key(tmp_path, run, message):
    path = tmp_path / "params.yaml"
    path.write_text(__import__("yaml").safe_dump({"distill": {"runs": {"bad": run}}}))
    with pytest.raises(ValueError) as err:
        load_params(path)
    assert message in str(err.value)


def test_distilled_rank_above_the_table_names_embed_dim(direction_set, tmp_path):
    params = build_params(
        directions={"layers": [2]},
        distill={
            "train": {"layer": 2, "epochs": 1, "buffer_rows": 64},
            "runs": {"big": {"approach": "distilled", "embed_dim": 9, "hidden_dim": 4}},
        },
    )
    with pytest.raises(ValueError, match="distilled embed_dim=9 exceeds"):
        distill.run(params, "big", direction_set, tmp_path / "out", tmp_path / "live")
    assert not (tmp_path / "out").exists()


def row(name, approach, val, test, unseen, seeds=None, size=None, table_cos=None):
    metrics = {"val_cos": val, "test_cos": test, "test_unseen_cos": unseen}
    if seeds is not None:
        metrics |= {
            "num_seeds": len(seeds),
            "seeds": {str(i): {"test_unseen_cos": s, "test_cos": s} for i, s in enumerate(seeds)},
            "test_cos_ci95_low": min(seeds),
            "test_cos_ci95_high": max(seeds),
            "inference_bytes": size,
        }
    if table_cos is not None:
        metrics["table_cos"] = table_cos
    return Row(name, name, metrics, approach=approach)


ROWS = [
    row("char_a", "char_cnn", 0.30, 0.31, 0.30, seeds=[0.29, 0.31]),
    row("char_b", "char_cnn", 0.20, 0.40, 0.40, seeds=[0.39, 0.41]),  # best on test, not val
    row(CHAR_BASELINE, None, 0.28, 0.27, 0.25),
    row("trainable", "trainable", 0.01, 0.02, 0.01, seeds=[0.0, 0.02]),
    row("dist_a", "distilled", 0.55, 0.56, 0.56, seeds=[0.55, 0.57], size=1000, table_cos=0.9),
    row("frozen", "frozen_mlp", 0.68, 0.68, 0.68, seeds=[0.67, 0.69], size=48_000_000),
]


def test_char_entry_is_picked_on_val_against_the_bag_of_characters_baseline():
    entry = char_entry(ROWS, "text", TEACHER, RESTS)
    assert entry["value"] == 0.30 and "(char_a)" in entry["metric"]
    # It rests on the 35 unseen-token test concepts, not on all 40.
    assert (entry["rows"], entry["min_rows"]) == (35, 30)
    # t-interval of [0.29, 0.31]: mean 0.30, s = 0.01414, t(0.975, 1) = 12.706.
    assert entry["interval"] == pytest.approx([0.30 - 0.127062, 0.30 + 0.127062], abs=1e-5)
    assert entry["control_value"] == 0.25 and CHAR_BASELINE in entry["control"]
    assert entry["downstream_value"] == 0.01 and entry["n"] == 2
    # Without the baseline (or without unseen-token concepts) there is no entry.
    assert char_entry([r for r in ROWS if r.name != CHAR_BASELINE], "text", TEACHER, RESTS) is None


def test_a_char_headline_on_too_few_unseen_token_concepts_is_marked_on_the_summary_page():
    few = Rests(COUNTS | {"test_seen": 30, "test_unseen": 10}, min_rows=30)
    entry = check_entry(char_entry(ROWS, "text", TEACHER, few), "char")
    row = squeeze(summary_table([entry])).splitlines()[6].split(" | ")
    # value and control (same 10 concepts) are marks; the JSON keeps the numbers.
    assert row[2:5] == ["n=10 < 30", f"{CHAR_BASELINE}, same concepts", "n=10 < 30"]
    assert entry["value"] == 0.30 and entry["control_value"] == 0.25


def test_distilled_entry_reports_size_next_to_frozen_mlp():
    entry = distilled_entry(ROWS, "text", TEACHER, RESTS)
    assert entry["value"] == 0.56 and entry["interval"] == [0.55, 0.57]
    assert entry["control_value"] == 0.68 and entry["control_interval"] == [0.67, 0.69]
    assert entry["downstream_value"] == 1000
    assert entry["downstream"] == "inference size in bytes: 1KB vs 48MB for frozen"
    rows = [r for r in ROWS if r.approach != "distilled"]
    assert distilled_entry(rows, "text", TEACHER, RESTS) is None
    table = comparison_table(ROWS, (1,), "text", TEACHER, RESTS)
    assert "vs the teacher rows: dist_a: 0.9000" in table


def test_stage_and_evaluate_with_the_new_students(direction_set, tmp_path):
    runs = {
        "char": {
            "approach": "char_cnn",
            "embed_dim": 4,
            "channels": 6,
            "kernel_size": 3,
            "hidden_dim": 8,
        },
        "dist": {"approach": "distilled", "embed_dim": 4, "hidden_dim": 8},
        "frozen": {"approach": "frozen_mlp", "hidden_dim": 8},
    }
    params = build_params(
        directions={"layers": [2]},
        distill={
            "train": {
                "layer": 2,
                "epochs": 2,
                "batch_size": 32,
                "lr": 0.01,
                "buffer_rows": 64,
                "seeds": [0, 1],
            },
            "runs": runs,
        },
        evaluate={"knn_k": 3, "retrieval_k": [1, 10]},
    )
    for name in runs:
        distill.run(
            params, name, direction_set, tmp_path / "distill" / name, tmp_path / "live" / name
        )
    out = tmp_path / "metrics"
    results = evaluate.run(
        params,
        direction_set,
        tmp_path / "distill",
        tmp_path / "live",
        out / "distill.json",
        out / "comparison.md",
        out / "curves.png",
    )
    assert 0 < results["dist"]["table_cos"] < 1 and "table_cos" not in results["frozen"]
    assert results["char"]["trainable_params"] * 4 == results["char"]["inference_bytes"]
    text = (out / "comparison.md").read_text()
    assert "Char CNN e=4,c=6,k=3,h=8" in text and "Distilled e=4,h=8" in text
    assert "Baseline: char 1-4-gram counts + ridge" in text
    metrics = [entry["metric"] for entry in results["summary"]]
    assert len(metrics) == 2 and "distilled-embedding" in metrics[1]  # no unseen-token concepts
    assert results["summary"][1]["control_value"] == results["frozen"]["test_cos"]
