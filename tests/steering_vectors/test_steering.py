"""Steering: hooks, scoring, gradients, training on the offline task, and the stage.

`dvc exp run -S steering.layers=...` re-running only this stage is tested with the
whole DAG in tests/test_dvc_pipeline.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from pipeline.common.live import read_metric
from pipeline.common.params import to_dict
from pipeline.common.teacher import decoder_blocks, load_causal_lm
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.words import build_concepts
from pipeline.steering_vectors import steering
from pipeline.steering_vectors.evaluation import (
    Answers,
    accuracy,
    alpha_weights,
    best_of,
    bootstrap_gain,
    random_like,
    route,
    sweep_coefficients,
    weighted_average,
    with_controls,
)
from pipeline.steering_vectors.params import SteeringParams
from pipeline.steering_vectors.questions import (
    McQuestion,
    arithmetic_questions,
    category_questions,
    write_questions,
)
from pipeline.steering_vectors.vector import (
    SteeringVector,
    correct,
    encode,
    ending_scores,
    load_vectors,
    mean_difference,
    prompt_format,
    save_vectors,
    steer,
    train_vector,
)
from tests.picture_checks import assert_picture
from tests.tables import squeeze

CAPS = {"train": 256, "val": 160, "test": 160}


@pytest.fixture(scope="module")
def tiny_lm(tiny_qwen3_path):
    return load_causal_lm(tiny_qwen3_path, None)


@pytest.fixture(scope="module")
def questions() -> list[McQuestion]:
    """The offline tasks on the tiny profile's word list (wordfreq, no WordNet)."""
    concepts, _ = build_concepts(WordlistParams(source="wordfreq", num_concepts=2000))
    category, _ = category_questions(concepts, "category", seed=0, caps=CAPS)
    return category + arithmetic_questions("arithmetic", seed=0, caps=CAPS)


def pick(questions, task, split, count=None):
    return [q for q in questions if q.task == task and q.split == split][:count]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hooks_leave_the_model_bit_identical(tiny_lm):
    model, tokenizer = tiny_lm
    ids = tokenizer(["seven plus three is ten"], return_tensors="pt")["input_ids"]
    before = logits(model, ids)
    vector = SteeringVector((0, 2), 64)
    torch.nn.init.normal_(vector.v)
    with steer(model, vector.deltas()):
        assert not torch.equal(logits(model, ids), before)
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(RuntimeError, match="boom"), steer(model, vector.deltas()):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), before), "hooks survived an exception"
    assert all(not layer._forward_hooks for layer in decoder_blocks(model))
    with steer(model, SteeringVector((0, 1, 3), 64).deltas()):  # v = 0
        assert torch.equal(logits(model, ids), before)


def capture_inputs(model, layer):
    """Forward pre-hook on layer `layer`: the residual stream it receives."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return seen, decoder_blocks(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("position", [0, 3])
def test_residual_stream_shifts_by_exactly_scale_times_v(tiny_lm, position):
    model, tokenizer = tiny_lm
    ids = tokenizer(["a word that starts with a letter"], return_tensors="pt")["input_ids"]
    vector = SteeringVector((1,), 64)
    with torch.no_grad():
        vector.v.normal_()
        vector.scales.fill_(0.7)
    seen, handle = capture_inputs(model, 2)  # layer 2 reads what layer 1 wrote
    try:
        logits(model, ids)
        with steer(model, vector.deltas(), position):
            logits(model, ids)
    finally:
        handle.remove()
    plain, steered = seen
    shift = (0.7 * vector.v).detach()
    assert torch.equal(steered[:, position:], plain[:, position:] + shift)
    assert torch.equal(steered[:, :position], plain[:, :position])


@pytest.mark.parametrize("position", [None, 0, 5])
def test_scores_equal_token_logprobs_from_the_logits(tiny_lm, questions, position):
    """Scores (context cached once, endings batched) = one plain forward per ending.

    With a vector (at every position, or from token 5 on, which falls inside some
    contexts and inside some endings) the same holds under the same hooks.
    """
    model, tokenizer = tiny_lm
    chosen = pick(questions, "category", "val", 2) + pick(questions, "arithmetic", "val", 2)
    data = encode(chosen, tokenizer)
    assert len({len(c) for c in data.contexts}) > 1 and len({len(e) for e in data.endings[0]}) > 1
    vector = SteeringVector((0, 2), 64)
    if position is not None:
        torch.nn.init.normal_(vector.v)
    with steer(model, vector.deltas(), position or 0), torch.no_grad():
        scores = ending_scores(model, data.batch(range(len(chosen))))  # (4, 4)
        for i, question in enumerate(chosen):
            for j, ending in enumerate(question.endings):
                context = tokenizer(question.context)["input_ids"]
                end = tokenizer(" " + ending, add_special_tokens=False)["input_ids"]
                logprobs = logits(model, torch.tensor([context + end]))[0].log_softmax(-1)
                total = sum(logprobs[len(context) + k - 1, t] for k, t in enumerate(end))
                assert scores[i, j].item() * len(end) == pytest.approx(total.item(), abs=1e-4)


def test_gradients_reach_v_and_scales_only(tiny_lm, questions):
    model, tokenizer = tiny_lm
    data = encode(pick(questions, "category", "train", 4), tokenizer)
    vector = SteeringVector((0, 2, 3), 64)
    torch.nn.init.normal_(vector.v, std=0.1)
    with steer(model, vector.deltas()):
        scores = ending_scores(model, data.batch(range(4)))
    torch.nn.functional.cross_entropy(scores, data.labels).backward()
    assert vector.v.grad is not None and vector.v.grad.abs().sum() > 0
    assert vector.scales.grad is not None and (vector.scales.grad != 0).all()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_training_beats_the_unsteered_model_on_held_out_questions(tiny_lm, questions):
    """The category task has a known direction: raise the log-prob of a-m initial tokens."""
    model, tokenizer = tiny_lm
    train, val, test = (encode(pick(questions, "category", s), tokenizer) for s in CAPS)
    params = SteeringParams(model="unused", epochs=3, batch_size=16, lr=0.02, keywords={})
    unsteered = {
        name: accuracy(correct(model, data, {})) for name, data in (("val", val), ("test", test))
    }
    vector = SteeringVector((0, 2, 3), 64)
    logged = []
    fit = train_vector(model, vector, train, val, params, on_epoch=logged.append)
    assert logged == [{"epoch": e, "train_loss": fit.train_loss[e - 1]} for e in (1, 2, 3)] + [
        {"epoch": 3, "val_acc": fit.val_acc}
    ]
    steered = accuracy(correct(model, test, vector.deltas()))
    assert fit.val_acc >= unsteered["val"] + 0.1, (fit.val_acc, unsteered)
    assert steered >= unsteered["test"] + 0.1, (steered, unsteered)
    assert fit.val_acc == accuracy(correct(model, val, vector.deltas()))


def test_scales_start_at_the_seeds_early_mid_late_on_three_layers():
    assert SteeringVector((0, 2, 3), 8).scales.tolist() == pytest.approx([0.5, 1.0, 0.3])
    assert SteeringVector((1, 3), 8).scales.tolist() == [1.0, 1.0]
    assert SteeringVector((1,), 8).scales.tolist() == [1.0]
    assert SteeringVector((0, 2, 3), 8).v.abs().sum() == 0  # step 0: the unsteered model


def test_vectors_round_trip_through_safetensors(tmp_path):
    vector = SteeringVector((1, 3), 8)
    torch.nn.init.normal_(vector.v)
    save_vectors(tmp_path, {"t.multi": vector}, {"model": "m"})
    loaded, config = load_vectors(tmp_path)
    assert config["model"] == "m" and loaded["t.multi"].layers == (1, 3)
    assert torch.equal(loaded["t.multi"].v, vector.v)
    assert (tmp_path / "model.safetensors").is_file()


def test_eval_helpers():
    base = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    same = bootstrap_gain(base, base, samples=200)
    assert same == {"gain": 0.0, "gain_ci_low": 0.0, "gain_ci_high": 0.0}
    better = bootstrap_gain(base, torch.ones(8, dtype=torch.bool), samples=500)
    assert better["gain"] == pytest.approx(5 / 8)
    assert 0 < better["gain_ci_low"] < 5 / 8 < better["gain_ci_high"] <= 1
    assert alpha_weights(0.25, 3) == [0.25, 0.375, 0.375] and alpha_weights(0.3, 1) == [1.0]
    a, b = {0: torch.ones(2), 2: torch.ones(2)}, {2: torch.full((2,), 3.0)}
    mixed = weighted_average([a, b], [0.5, 0.5])
    assert mixed[0].tolist() == [0.5, 0.5] and mixed[2].tolist() == [2.0, 2.0]
    keywords = {"math": ("plus", "minus")}
    assert route("seven PLUS three is", keywords, ["cat", "math"]) == "math"
    assert route("A word that", keywords, ["cat", "math"]) == "cat"
    assert route("A word", {"cat": ("word",), "math": ("plus",)}, ["cat", "math"]) == "cat"
    assert route("none", {"cat": ("word",), "math": ("plus",)}, ["cat", "math"]) is None
    assert best_of({0.5: 0.6, 1.3: 0.6, 2.0: 0.4}) == 1.3


def test_answers_are_computed_once_per_question_set_and_vector(tiny_lm, questions):
    model, tokenizer = tiny_lm
    val = encode(pick(questions, "arithmetic", "val", 6), tokenizer)
    other = encode(pick(questions, "arithmetic", "test", 6), tokenizer)
    vector = SteeringVector((1,), model.config.hidden_size)
    vector.v.data = torch.randn(
        model.config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    answers = Answers(model)
    first = answers(val, vector.deltas())
    assert torch.equal(first, correct(model, val, vector.deltas()))
    assert answers(val, vector.deltas(1.0)) is first  # equal vector: answered from memory
    answers(other, vector.deltas())  # other questions
    answers(val, vector.deltas(2.0))  # another vector
    answers(val, {})
    assert (answers.computed, answers.reused) == (4, 1)
    planted = torch.zeros(6, dtype=torch.bool)
    answers.remember(other, {}, planted)
    assert answers(other, {}) is planted and answers.reused == 2


def test_the_prompt_format_says_raw_text_and_what_sits_at_position_0(tiny_lm):
    _, tokenizer = tiny_lm  # Qwen3's tokenizer adds no BOS
    line = prompt_format(tokenizer)
    assert "raw text, no chat template" in line
    assert "no start token: position 0 is the text's first token" in line
    assert "\n" not in line


def test_the_sweep_scores_each_coefficient_on_val():
    val = object()
    right = {0.5: [1, 0, 0, 0], 1.0: [1, 1, 0, 0], 2.0: [1, 1, 1, 0]}

    def answers(data, deltas):
        assert data is val
        return torch.tensor(right[float(deltas[3])], dtype=torch.bool)

    sweep = sweep_coefficients(answers, lambda c: {3: torch.tensor(c)}, val, [0.5, 1.0, 2.0])
    assert sweep == {0.5: 0.25, 1.0: 0.5, 2.0: 0.75} and best_of(sweep) == 2.0


def test_keyword_routing_matches_whole_words_case_insensitively():
    tasks = ["story", "math"]
    keywords = {"math": SteeringParams(model="unused").keywords["math"]}  # the defaults
    assert "math" in keywords["math"] and "solve" in keywords["math"]
    # Substrings of other words do not route (both went to math before).
    assert route("The aftermath of the storm", keywords, tasks) == "story"
    assert route("They resolve to leave", keywords, tasks) == "story"
    assert route("Estimate how manyfold", keywords, tasks) == "story"
    # The defaults are whole words of word problems: a recipe's "how much" is no keyword.
    assert route("She asks how much flour to add", keywords, tasks) == "story"
    assert route("How many apples are left in total?", keywords, tasks) == "math"
    # Whole words and phrases match in any case and across spacing.
    assert route("She asks how much flour", {"math": ("flour s",)}, tasks) == "story"
    assert route("A MATH problem", keywords, tasks) == "math"
    assert route("Solve: 3 + 4", keywords, tasks) == "math"
    assert route("How  many apples?", {"math": ("how many",)}, tasks) == "math"
    assert route("is c++ fast", {"math": ("C++",)}, tasks) == "math"  # regex chars literal
    assert route("is c+ fast", {"math": ("C++",)}, tasks) == "story"


def layer_outputs(model, ids: list[int], layers) -> dict[int, torch.Tensor]:
    """Decoder layer outputs (1, T, D) of one unpadded sequence."""
    seen = {}

    def keep(layer):
        def hook(module, args, out):
            seen[layer] = out[0] if isinstance(out, tuple) else out

        return hook

    blocks = decoder_blocks(model)
    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in layers]
    with torch.no_grad():
        model.base_model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return seen


def test_mean_difference_is_the_hand_computed_contrast(tiny_lm, questions):
    model, tokenizer = tiny_lm
    chosen = pick(questions, "arithmetic", "train", 6)
    data = encode(chosen, tokenizer)
    layers = (1, 3)
    got = mean_difference(model, data, layers, batch_size=4)  # padded batches of 4 x 4 rows
    # By hand: one unpadded sequence at a time, the layer output averaged over the ending.
    right = {layer: [] for layer in layers}
    wrong = {layer: [] for layer in layers}
    for q in range(len(data)):
        for e, ending in enumerate(data.endings[q]):
            seen = layer_outputs(model, data.contexts[q] + ending, layers)
            for layer in layers:
                mean = seen[layer][0, len(data.contexts[q]) :].mean(0)
                (right if e == int(data.labels[q]) else wrong)[layer].append(mean)
    for layer in layers:
        expected = torch.stack(right[layer]).mean(0) - torch.stack(wrong[layer]).mean(0)
        torch.testing.assert_close(got[layer], expected, atol=1e-5, rtol=1e-4)
    # Must-fail: other labels give another vector.
    flipped = encode([replace(q, label=(q.label + 1) % 4) for q in chosen], tokenizer)
    other = mean_difference(model, flipped, layers)
    assert not torch.allclose(other[1], got[1], atol=1e-3)


def test_random_control_keeps_layers_and_norms_not_the_direction():
    v = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    deltas = {2: 0.5 * v, 5: 2.0 * v}
    control = random_like(deltas, seed=3)
    assert set(control) == {2, 5}
    assert [control[k].norm().item() for k in (2, 5)] == pytest.approx([2.5, 10.0])
    cosine = torch.nn.functional.cosine_similarity(control[2], control[5], dim=0)
    assert cosine.item() == pytest.approx(1.0)  # one direction, like the trained v
    assert abs(torch.nn.functional.cosine_similarity(control[2], v, dim=0).item()) < 0.99
    assert torch.equal(random_like(deltas, seed=3)[2], control[2])
    assert not torch.equal(random_like(deltas, seed=4)[2], control[2])
    assert random_like({}, seed=0) == {}
    right = {"val": torch.ones(8, dtype=torch.bool), "test": torch.ones(8, dtype=torch.bool)}
    base = torch.zeros(8, dtype=torch.bool)
    half = torch.tensor([1, 0] * 4, dtype=torch.bool)
    scored = with_controls(right, base, half, samples=200, seed=0)
    assert scored["gain"] == 1.0 and scored["random_test"] == 0.5
    assert scored["over_random"] == 0.5
    assert 0 < scored["over_random_ci_low"] <= 0.5 <= scored["over_random_ci_high"] <= 1


def stage_params(model: str, **overrides) -> SteeringParams:
    base = dict(
        model=model,
        dtype="float32",
        layers=(2, 3),
        single_layers=(3,),
        epochs=1,
        batch_size=16,
        lr=0.05,
        coefficients=(0.5, 1.0, 2.0),
        alphas=(0.0, 0.5, 1.0),
        keywords={"arithmetic": ("plus", "minus")},
        bootstrap_samples=200,
        device="cpu",
    )
    return SteeringParams(**(base | overrides))


def small_mcdata(folder: Path, questions: list[McQuestion], count: int = 24) -> Path:
    folder.mkdir(parents=True)
    chosen = [
        q for t in ("category", "arithmetic") for s in CAPS for q in pick(questions, t, s, count)
    ]
    write_questions(folder / "questions.jsonl", chosen)
    return folder


def test_stage_cli_writes_vectors_metrics_and_table(tmp_path, questions, tiny_qwen3_path):
    mcdata = small_mcdata(tmp_path / "mcdata", questions)
    params_file = tmp_path / "params.yaml"
    tasks = {"category": {"source": "category"}, "arithmetic": {"source": "arithmetic"}}
    plain = json.loads(json.dumps(to_dict(stage_params(tiny_qwen3_path))))  # tuples -> lists
    params_file.write_text(yaml.safe_dump({"mcdata": {"tasks": tasks}, "steering": plain}))
    app = typer.Typer()
    app.command()(steering.command)
    out, metrics, table = (
        tmp_path / "steering",
        tmp_path / "m" / "steering.json",
        tmp_path / "m" / "steering.md",
    )
    args = [
        "--params",
        params_file,
        "--mcdata",
        mcdata,
        "--out",
        out,
        "--metrics",
        metrics,
        "--table",
        table,
        "--live",
        tmp_path / "live",
        "--plot",
        tmp_path / "plots" / "steering.png",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    # dvclive: each vector's train loss per epoch and its val accuracy at the last epoch.
    live, epochs = tmp_path / "live", stage_params(tiny_qwen3_path).epochs
    for task in ("category", "arithmetic"):
        for vector in ("single_L3", "multi"):
            steps, losses = read_metric(live, f"{task}/{vector}/train_loss")
            assert steps == list(range(1, epochs + 1)) and all(map(math.isfinite, losses))
            assert read_metric(live, f"{task}/{vector}/val_acc")[0] == [epochs]
    last = json.loads((live / "metrics.json").read_text())
    assert last["step"] == epochs and set(last) == {"step", "category", "arithmetic"}
    pixels = assert_picture(tmp_path / "plots" / "steering.png", 800, 500)
    assert pixels.shape[0] > pixels.shape[1] / 2  # two tasks: two rows of panels
    summary = json.loads(metrics.read_text())
    # The run's description is beside the vectors, not in the metrics; one output line.
    info = json.loads((out / "info.json").read_text())
    assert info["model"] == tiny_qwen3_path and "model" not in summary and "layers" not in summary
    (line,) = result.stdout.splitlines()  # progress goes to stderr
    assert line.startswith("steering: test gain of the best vector over unsteered: category")
    cat = summary["tasks"]["category"]
    assert set(cat["single_layer"]) == {"L3"} and cat["multi_layer"]["layers"] == [2, 3]
    assert set(cat["coefficient_sweep"]["val"]) == {"coef_0.5", "coef_1", "coef_2"}
    final = cat["best_coefficient"]
    assert final["gain_ci_low"] <= final["gain"] <= final["gain_ci_high"]
    assert final["gain"] == pytest.approx(final["test"] - cat["unsteered"]["test"])
    combined = summary["combined"]
    assert combined["routing"]["routed_right"] == 1.0
    by_task = combined["routing"]["by_task"]
    assert by_task["arithmetic"] == {"routed": 24, "precision": 1.0, "recall": 1.0}
    assert by_task["category"] == {"routed": 24, "precision": 1.0, "recall": 1.0}
    for name in ("best_single", "multi_layer", "best_coefficient", "mean_difference"):
        row = cat[name]
        assert row["no_question_gain_ci_low"] <= row["no_question_gain"]
        assert row["question_effect"] == pytest.approx(row["gain"] - row["no_question_gain"])
        assert row["prior_only"] == (row["question_effect_ci_low"] <= 0)
    # The category task asks every question after one context: without the question is
    # the same question, so every gain is an option prior and marked.
    assert cat["no_question"]["distinct_contexts"] == 1 and cat["best_coefficient"]["prior_only"]
    arith = summary["tasks"]["arithmetic"]["no_question"]
    assert arith["distinct_contexts"] == 24 and arith["context_changed"] == 1.0
    assert [e["metric"].split(":")[0] for e in summary["summary"]] == ["category", "arithmetic"]
    assert combined["questions"]["test"] == 48
    vectors, config = load_vectors(out)
    assert set(vectors) == {
        f"{t}.{n}" for t in ("category", "arithmetic") for n in ("single_L3", "multi")
    }
    assert config["final"]["category"]["vector"] in vectors
    for name in ("best_single", "multi_layer", "best_coefficient", "mean_difference"):
        row = cat[name]
        assert row["over_random"] == pytest.approx(row["test"] - row["random_test"])
        assert row["over_random_ci_low"] <= row["over_random"] <= row["over_random_ci_high"]
    assert cat["mean_difference"]["coefficient"] in (0.5, 1.0, 2.0)
    text = squeeze(table.read_text())
    assert "| category | mean difference (x" in text and "gain over random" in text
    assert "| category | 24 |" in text and "keyword routing" in text and "weighted average" in text
    # 24 test questions per task, below steering.min_rows (30): marks, not numbers.
    assert "| category | 24 | n=24 < 30 | n=24 < 30 (L3) | n=24 < 30 |" in text
    assert "| method | val (n=48) | test (n=48) | gain [95% CI] |" in text
    assert "gain without question [95% CI]" in text and "| prior only |" in text
    assert "| arithmetic | plus, minus | 24 | 100.0% | 100.0% |" in text


def test_stage_refuses_bad_layers_and_unknown_keyword_tasks_before_writing(
    tmp_path, questions, tiny_qwen3_path
):
    mcdata = small_mcdata(tmp_path / "mcdata", questions, count=4)
    paths = (mcdata, tmp_path / "out", tmp_path / "live", tmp_path / "m.json", tmp_path / "t.md")
    paths += (tmp_path / "p.png",)
    with pytest.raises(ValueError, match=r"steering.layers holds \[7\].*4 decoder layers"):
        steering.run(stage_params(tiny_qwen3_path, layers=(1, 7)), *paths)
    with pytest.raises(ValueError, match=r"steering.keywords names \['math'\]"):
        steering.run(stage_params(tiny_qwen3_path, keywords={"math": ("plus",)}), *paths)
    assert not any(p.exists() for p in paths[1:])
