"""Distractors that do not give the answer away: options-only scorers stay near chance.

Each scorer sees the 4 endings only, never the question. On every built task each stays
within `TOLERANCE` of chance (25%); on the old distractors (answer +-1, +-2, +-10, x2, //2
for GSM8K; +-3 for arithmetic, kept here as `old_*`) some scorer is far above it.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from pipeline.steering_vectors.params import McDataParams, McTaskParams
from pipeline.steering_vectors.questions import (
    NUM_ENDINGS,
    McQuestion,
    arithmetic_questions,
    build_task,
    category_questions,
    number_words,
)
from tests.steering_vectors.test_questions import synthetic_words, word_table

CAPS = {"train": 1000, "val": 1000, "test": 1000}
CHANCE = 1 / NUM_ENDINGS
TOLERANCE = 0.06  # ~3 standard errors at the 300-900 questions of each task here
WORD_VALUES = {number_words(n): n for n in range(100)}

Scorer = Callable[[Sequence[str]], int]


def value(ending: str) -> int:
    return int(ending) if re.fullmatch(r"-?\d+", ending) else WORD_VALUES[ending]


def offsets_of(endings: Sequence[str]) -> int:
    """The option most of the others are small offsets, doubles or halves of."""
    values = [value(e) for e in endings]

    def related(a: int, b: int) -> bool:
        return b - a in (-10, -3, -2, -1, 1, 2, 3, 10) or b == 2 * a or b == a // 2

    counts = [sum(related(a, b) for b in values if b != a) for a in values]
    return counts.index(max(counts))


def middle_value(endings: Sequence[str]) -> int:
    values = [value(e) for e in endings]
    mean = sum(values) / len(values)
    gaps = [abs(v - mean) for v in values]
    return gaps.index(min(gaps))


def longest(endings: Sequence[str]) -> int:
    lengths = [len(e) for e in endings]
    return lengths.index(max(lengths))


def first_token(ending: str) -> str:
    """A run of letters, one digit (digits are single tokens in Qwen/Llama-3) or one symbol."""
    found = re.match(r"[A-Za-z]+|\d|\S", ending.strip())
    assert found is not None
    return found.group(0)


def most_frequent_first_token(endings: Sequence[str]) -> int:
    firsts = [first_token(e) for e in endings]
    counts = Counter(firsts)
    scores = [counts[f] for f in firsts]
    return scores.index(max(scores))


TEXT_SCORERS: dict[str, Scorer] = {
    "longest": longest,
    "most frequent first token": most_frequent_first_token,
}
NUMERIC_SCORERS: dict[str, Scorer] = {
    "offsets of": offsets_of,
    "middle value": middle_value,
} | TEXT_SCORERS


def accuracy(questions: Sequence[McQuestion], scorer: Scorer) -> float:
    return sum(scorer(q.endings) == q.label for q in questions) / len(questions)


# --- tasks: new generator, and the old one kept only here as the "must fail" case ---------


def old_gsm8k_endings(answer: int, rng: random.Random) -> tuple[list[str], int]:
    near = {answer + d for d in (-10, -2, -1, 1, 2, 10)} | {answer * 2, answer // 2}
    near = {n for n in near if n >= 0 or answer < 0} - {answer}
    wrong = [str(n) for n in rng.sample(sorted(near), 3)]
    label = rng.randrange(NUM_ENDINGS)
    return wrong[:label] + [str(answer)] + wrong[label:], label


def old_arithmetic_endings(answer: int, rng: random.Random) -> tuple[list[str], int]:
    near = [answer + d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0]
    wrong = [number_words(n) for n in rng.sample(near, 3)]
    label = rng.randrange(NUM_ENDINGS)
    return wrong[:label] + [number_words(answer)] + wrong[label:], label


def gsm8k_answers(count: int = 900) -> list[int]:
    """Answers shaped like GSM8K's: mostly small, a long tail (log-uniform 1..5000)."""
    rng = random.Random(7)
    return [round(5000 ** rng.random()) for _ in range(count)]


def gsm8k_questions() -> list[McQuestion]:
    rows = [
        {"question": f"Problem {i}: how many?", "answer": f"... #### {a:,}"}
        for i, a in enumerate(gsm8k_answers())
    ]
    task = McTaskParams("hf", "org/gsm8k", config="main", format="gsm8k")
    params = McDataParams(tasks={"math": task}, max_train=1000, max_val=1000, max_test=1000)

    def load(path, config, revision):
        return {"train": rows[:600], "test": rows[600:]}

    return build_task("math", task, params, hf_loader=load)[0]


def old_questions(
    answers: Sequence[int], endings: Callable[[int, random.Random], tuple[list[str], int]]
) -> list[McQuestion]:
    rng = random.Random(0)
    out = []
    for i, answer in enumerate(answers):
        choices, label = endings(answer, rng)
        out.append(McQuestion(f"old-{i}", "old", "train", "Q:", tuple(choices), label))
    return out


def arithmetic_answers() -> list[int]:
    questions = arithmetic_questions("math", seed=0, caps=CAPS)
    return [value(q.endings[q.label]) for q in questions]


BUILT: dict[str, tuple[Callable[[], list[McQuestion]], dict[str, Scorer]]] = {
    "arithmetic": (lambda: arithmetic_questions("math", seed=0, caps=CAPS), NUMERIC_SCORERS),
    "gsm8k": (gsm8k_questions, NUMERIC_SCORERS),
    "category": (
        lambda: category_questions(word_table(synthetic_words()), "cat", 0, CAPS)[0],
        TEXT_SCORERS,
    ),
}


@pytest.mark.parametrize("task", sorted(BUILT))
def test_options_only_scorers_are_near_chance_on_every_built_task(task):
    build, scorers = BUILT[task]
    questions = build()
    assert len(questions) >= 300
    scores = {name: accuracy(questions, scorer) for name, scorer in scorers.items()}
    assert all(abs(s - CHANCE) <= TOLERANCE for s in scores.values()), scores


def test_the_old_distractors_give_the_answer_away():
    """The must-fail case: the same scorers, on the old generators, are far above chance."""
    gsm8k = old_questions(gsm8k_answers(), old_gsm8k_endings)
    arithmetic = old_questions(arithmetic_answers(), old_arithmetic_endings)
    assert accuracy(gsm8k, offsets_of) > 0.8
    assert max(accuracy(arithmetic, s) for s in NUMERIC_SCORERS.values()) > CHANCE + 0.2


def test_distractors_are_other_answers_of_similar_magnitude():
    questions = gsm8k_questions()
    answers = set(gsm8k_answers())
    for q in questions:
        values = [int(e) for e in q.endings]
        assert len(set(values)) == NUM_ENDINGS and set(values) <= answers
        assert all(v >= 0 for v in values)
    # Similar magnitude: in the median question the options span under a factor of 2.
    spans = sorted(max(map(int, q.endings)) / min(map(int, q.endings)) for q in questions)
    assert spans[len(spans) // 2] < 2
