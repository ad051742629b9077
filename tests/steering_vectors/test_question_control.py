"""The question control (each question after another question's context), keyword routing's
precision and recall, the defaults' agreement with params.yaml, and the summary block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.common.summary import check_entry
from pipeline.common.teacher import load_causal_lm
from pipeline.steering_vectors.evaluation import (
    derangement,
    question_control,
    route,
    routing_scores,
    summary_entries,
)
from pipeline.steering_vectors.params import SteeringParams
from pipeline.steering_vectors.questions import McQuestion, arithmetic_questions
from pipeline.steering_vectors.vector import encode, ending_scores

ROOT = Path(__file__).resolve().parents[2]


def test_derangement_moves_every_question_and_is_seeded():
    for count in (2, 3, 50):
        swap = derangement(count, seed=3)
        assert sorted(swap) == list(range(count))
        assert all(j != i for i, j in enumerate(swap))
        assert derangement(count, seed=3) == swap
    assert derangement(50, seed=4) != derangement(50, seed=3)
    with pytest.raises(ValueError, match="at least 2 questions, got 1"):
        derangement(1, seed=0)


def toy_answers(n: int = 400):
    """Questions whose context names the answer and whose right option is also marked.

    Returns (right(shift, contexts), contexts, swapped contexts): an answer is the argmax of
    seeded noise plus `shift(contexts)` over 4 options.
    """
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=generator)
    noise = torch.randn(n, 4, generator=generator)
    swapped = labels[derangement(n, seed=0)]

    def right(shift, contexts: torch.Tensor) -> torch.Tensor:
        return (noise + shift(contexts)).argmax(1) == labels

    return right, labels, swapped


def one_hot(index: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, 4).double()


def test_an_ending_prior_gains_without_the_question_and_is_marked():
    right, contexts, swapped = toy_answers()
    marked = one_hot(contexts)  # the right option's own mark, whatever the context says

    def unsteered(c):
        return torch.zeros(len(c), 4)

    def ending_prior(c):
        return 10 * marked  # shifts the marked ending's score, ignores the context

    out = question_control(
        right(ending_prior, contexts),
        right(unsteered, contexts),
        right(ending_prior, swapped),
        right(unsteered, swapped),
        samples=500,
        seed=0,
    )
    assert out["no_question_test"] == 1.0 and out["no_question_gain"] > 0.6
    assert out["question_effect"] == 0.0 and out["prior_only"] is True


def test_a_vector_that_reads_the_context_is_not_marked():
    right, contexts, swapped = toy_answers()

    def unsteered(c):
        return torch.zeros(len(c), 4)

    def reads_context(c):
        return 10 * one_hot(c)  # raises the option the context names

    base, steered = right(unsteered, contexts), right(reads_context, contexts)
    base_sw, steered_sw = right(unsteered, swapped), right(reads_context, swapped)
    out = question_control(steered, base, steered_sw, base_sw, samples=500, seed=0)
    assert steered.all() and 0.15 < out["no_question_test"] < 0.4  # right by coincidence only
    gain = steered.double().mean() - base.double().mean()
    assert out["question_effect"] == pytest.approx(gain.item() - out["no_question_gain"])
    assert out["question_effect_ci_low"] > 0.5 and out["prior_only"] is False
    # The same vector, judged without swapping (the question kept), would look like a prior.
    assert question_control(steered, base, steered, base, 500, 0)["prior_only"] is True


def test_swapped_contexts_score_like_the_other_questions_texts(tiny_qwen3_path):
    model, tokenizer = load_causal_lm(tiny_qwen3_path, None)
    questions = [q for q in arithmetic_questions("arith", 0, {"train": 8, "val": 1, "test": 1})]
    questions = [q for q in questions if q.split == "train"][:6]
    swap = derangement(len(questions), seed=1)
    asked = [
        McQuestion(q.id, q.task, q.split, questions[j].context, q.endings, q.label)
        for q, j in zip(questions, swap, strict=True)
    ]
    swapped = encode(questions, tokenizer).with_contexts_of(swap)
    with torch.no_grad():
        got = ending_scores(model, swapped.batch(range(6)))
        want = ending_scores(model, encode(asked, tokenizer).batch(range(6)))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="permutation of the 6 questions"):
        encode(questions, tokenizer).with_contexts_of([0, 0, 1, 2, 3, 4])


def test_routing_precision_and_recall_on_hand_built_routes():
    routes = {"story": ["story", "math", "story", "story"], "math": ["math", "story", None]}
    scores = routing_scores(routes, ["story", "math"])
    assert scores["story"] == {"routed": 4, "precision": 3 / 4, "recall": 3 / 4}
    assert scores["math"] == {"routed": 2, "precision": 1 / 2, "recall": 1 / 3}
    assert routing_scores({"a": [None], "b": ["b"]}, ["a", "b"])["a"] == {
        "routed": 0,
        "precision": None,
        "recall": 0.0,
    }


def test_default_keywords_are_whole_words_and_the_profiles_agree():
    defaults = SteeringParams(model="unused").keywords
    assert all(" " not in word and word.isalpha() for w in defaults.values() for word in w)
    real = yaml.safe_load((ROOT / "params.yaml").read_text())["steering"]["keywords"]
    assert {t: tuple(w) for t, w in real.items()} == defaults
    tiny = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())["steering"]["keywords"]
    # The tiny profile's math task is "seven plus three is": its own whole words.
    assert all(" " not in word for words in tiny.values() for word in words)
    contexts = [
        q.context for q in arithmetic_questions("math", 0, {"train": 5, "val": 5, "test": 5})
    ]
    assert all(route(c, tiny, ["reasoning", "math"]) == "math" for c in contexts)
    assert route("A word that starts with a letter from a to m:", tiny, ["reasoning", "math"]) == (
        "reasoning"
    )


def row(gain: float, over: float, without: float, prior_only: bool) -> dict:
    return {
        "config": "single_L2",
        "coefficient": 0.5,
        "gain": gain,
        "gain_ci_low": gain - 0.1,
        "gain_ci_high": gain + 0.1,
        "over_random": over,
        "over_random_ci_low": over - 0.05,
        "over_random_ci_high": over + 0.05,
        "no_question_gain": without,
        "prior_only": prior_only,
    }


def test_summary_block_takes_the_best_vectors_numbers_as_the_table_shows_them():
    metrics = {
        "model": "data/teachers/tiny-qwen3",
        "tasks": {
            "reasoning": {
                "questions": {"test": 160},
                "best_coefficient": row(0.169, 0.25, 0.17, True),
            },
            "math": {
                "questions": {"test": 102},
                "best_coefficient": row(-0.039, -0.04, 0.0, False),
            },
        },
    }
    entries = summary_entries(metrics, min_rows=30)
    assert entries[0] == {
        "branch": "steering",
        "metric": "reasoning: test accuracy gain of the best vector (single_L2 x0.5) "
        "over unsteered",
        "value": 0.169,
        "interval": [pytest.approx(0.069), pytest.approx(0.269)],
        "interval_kind": "paired BCa bootstrap 95%",
        "control": "gain over a random vector of the same norm at the same layers",
        "control_value": 0.25,
        "control_interval": [0.2, 0.3],
        "downstream": "gain without the question (contexts deranged within the task); "
        "prior only: not clearly below the gain with it",
        "downstream_value": 0.17,
        "teacher": "data/teachers/tiny-qwen3",
        "n": 160,
        "rows": 160,
        "min_rows": 30,
        "caveat": None,
    }
    assert all(check_entry(entry, "steering") for entry in entries)
    assert (
        entries[1]["downstream"] == "gain without the question (contexts deranged within the task)"
    )
    assert entries[1]["n"] == 102 and entries[1]["value"] == -0.039
    many = {"model": "m", "tasks": {f"t{i}": metrics["tasks"]["math"] for i in range(5)}}
    assert [e["metric"][:2] for e in summary_entries(many, min_rows=30)] == ["t0", "t1", "t2"]
