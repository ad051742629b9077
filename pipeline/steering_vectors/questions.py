"""Multiple-choice questions in HellaSwag format: a context, 4 endings, the right one's index.

Sources, one per `mcdata.tasks` entry:

- `hf`: a Hugging Face dataset (HellaSwag, or GSM8K with other answers as numeric
  distractors), through the `datasets` library, imported only here.
- `jsonl`: a local file of the same records (a `split` field is optional).
- `category` (offline): "A word that belongs to the category C:", from the
  word list: WordNet lexnames where the word source has them, otherwise the
  property "starts with a letter from a to m".
- `arithmetic` (offline): "seven plus three is" -> " ten", answers in words.

Splits never share a question: HF data keeps its train split and halves its
evaluation split into val/test by a hash of the context; the category task draws
each split's questions from that split's words only; everything else is split by
a stable hash, 70/15/15.

    questions, stats = build_task("category", McTaskParams("category"), params, concepts)
    write_questions(out / QUESTIONS_FILE, questions)
    questions = read_questions(out / QUESTIONS_FILE)
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.common.splits import SPLITS, SplitFractions, split_of
from pipeline.steering_vectors.params import McDataParams, McTaskParams

QUESTIONS_FILE = "questions.jsonl"
NUM_ENDINGS = 4
DEFAULT_FRACTIONS = SplitFractions()
EVAL_HALVES = SplitFractions(train=0.0, val=0.5, test=0.5)
# Without WordNet categories, a property the context can name and any word has.
INITIAL_RANGE = ("a", "m")
INITIAL_LABEL = f"starts with a letter from {INITIAL_RANGE[0]} to {INITIAL_RANGE[1]}"
MIN_WORDNET_COVERAGE = 0.5
ARITHMETIC_MAX = 20
# Numeric distractors come from a window of this many consecutive distinct answers.
ANSWER_WINDOW = 8

Rows = Sequence[Mapping[str, Any]]
HfLoader = Callable[[str, str | None, str | None], Mapping[str, Rows]]


@dataclass(frozen=True)
class McQuestion:
    """One HellaSwag-format record; `endings` are stored without a leading space."""

    id: str
    task: str
    split: str
    context: str
    endings: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        where = f"question {self.id!r} (task {self.task})"
        if self.split not in SPLITS:
            raise ValueError(f"{where}: split must be one of {SPLITS}, got {self.split!r}")
        if not self.context.strip():
            raise ValueError(f"{where}: empty context")
        if len(self.endings) != NUM_ENDINGS or not all(e.strip() for e in self.endings):
            raise ValueError(f"{where}: needs {NUM_ENDINGS} non-empty endings, got {self.endings}")
        if not 0 <= self.label < NUM_ENDINGS:
            raise ValueError(f"{where}: label must be in 0..{NUM_ENDINGS - 1}, got {self.label}")

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"endings": list(self.endings)})


Caps = dict[str, int]


def caps_of(params: McDataParams) -> Caps:
    return {"train": params.max_train, "val": params.max_val, "test": params.max_test}


# --- offline tasks -------------------------------------------------------------------------


def category_questions(
    concepts: pa.Table, task: str, seed: int, caps: Caps
) -> tuple[list[McQuestion], dict[str, Any]]:
    """One question per target word (up to the cap), distractors from the same split only."""
    texts = concepts.column("text").to_pylist()
    splits = concepts.column("split").to_pylist()
    tags = concepts.column("category").to_pylist()
    coverage = sum(tag is not None for tag in tags) / max(len(tags), 1)
    wordnet = coverage >= MIN_WORDNET_COVERAGE
    if wordnet:
        # Words without a synset take part in no question.
        cats = [_lexname_label(c) if c else None for c in tags]
        keep = [c is not None for c in cats]
    else:
        # Words without the property are the distractors.
        cats = [INITIAL_LABEL if _initial_in_range(t) else None for t in texts]
        keep = [True] * len(texts)
    labelled = [(t, s, c) for t, s, c, k in zip(texts, splits, cats, keep, strict=True) if k]
    questions: list[McQuestion] = []
    for split in SPLITS:
        words = [(t, c) for t, s, c in labelled if s == split]
        rng = random.Random(f"{seed}:{task}:{split}")
        questions += _category_split(words, task, split, rng, caps[split])
    stats = {"categories": "wordnet" if wordnet else "initial_letter", "wordnet_coverage": coverage}
    return questions, stats


def _category_split(
    words: list[tuple[str, str | None]], task: str, split: str, rng: random.Random, cap: int
) -> list[McQuestion]:
    targets = [(w, c) for w, c in words if c is not None]
    rng.shuffle(targets)
    out: list[McQuestion] = []
    pools: dict[str, list[str]] = {}
    for word, category in targets:
        if len(out) == cap:
            break
        # Without WordNet, words lacking the property (category None) are the distractors.
        if category not in pools:
            pools[category] = [w for w, c in words if c != category]
        pool = pools[category]
        if len(pool) < NUM_ENDINGS - 1:
            continue
        context = f"A word that {_category_phrase(category)}:"
        out.append(_shuffled(task, split, len(out), context, word, rng.sample(pool, 3), rng))
    return out


def _initial_in_range(word: str) -> bool:
    return INITIAL_RANGE[0] <= word[:1].lower() <= INITIAL_RANGE[1]


def _lexname_label(lexname: str) -> str:
    """`noun.animal` -> `animal (noun)`."""
    pos, _, name = lexname.partition(".")
    return f"{name} ({pos})" if name else lexname


def _category_phrase(category: str) -> str:
    return category if category == INITIAL_LABEL else f'belongs to the category "{category}"'


def number_words(n: int) -> str:
    """English words for 0..99 (`forty-two`)."""
    ones = "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    ones += "fourteen fifteen sixteen seventeen eighteen nineteen"
    tens = "twenty thirty forty fifty sixty seventy eighty ninety".split()
    if not 0 <= n < 100:
        raise ValueError(f"number_words covers 0..99, got {n}")
    if n < 20:
        return ones.split()[n]
    return tens[n // 10 - 2] + ("" if n % 10 == 0 else "-" + ones.split()[n % 10])


def numeric_distractors(answer: int, pool: Iterable[int], rng: random.Random) -> list[int] | None:
    """3 other answers from `pool`, of similar magnitude, that do not point at `answer`.

    A window of `ANSWER_WINDOW` consecutive distinct pool values (with the answer) is drawn
    uniformly among those holding the answer, and the 3 distractors uniformly inside it. The
    chance of a set of 4 is then the same whichever of them is the answer (away from the
    ends of the pool), so no rule on the options alone ("the middle value", "the option the
    others are offsets of") beats chance. None when the pool has under 3 other values.
    A negative distractor to a non-negative answer would be too easy to rule out: none.
    """
    values = sorted({v for v in pool if v >= 0 or answer < 0} | {answer})
    if len(values) < NUM_ENDINGS:
        return None
    width = min(ANSWER_WINDOW, len(values))
    at = values.index(answer)
    start = rng.randint(max(0, at - width + 1), min(at, len(values) - width))
    window = [v for v in values[start : start + width] if v != answer]
    return rng.sample(window, NUM_ENDINGS - 1)


def arithmetic_questions(task: str, seed: int, caps: Caps) -> list[McQuestion]:
    """`a plus/minus b is` for 0 <= a, b <= 20; distractors: other answers of the split."""
    numbers = range(ARITHMETIC_MAX + 1)
    problems = [(a, "plus", b, a + b) for a in numbers for b in numbers]
    problems += [(a, "minus", b, a - b) for a in numbers for b in numbers if b <= a]
    questions: list[McQuestion] = []
    for split in SPLITS:
        rng = random.Random(f"{seed}:{task}:{split}")
        chosen = [p for p in problems if _problem_split(*p[:3]) == split]
        pool = [p[3] for p in chosen]
        rng.shuffle(chosen)
        for index, (a, op, b, result) in enumerate(chosen[: caps[split]]):
            near = numeric_distractors(result, pool, rng)
            assert near is not None  # every split holds answers 0..40 on both sides
            wrong = [number_words(n) for n in near]
            context = f"{number_words(a)} {op} {number_words(b)} is"
            questions.append(
                _shuffled(task, split, index, context, number_words(result), wrong, rng)
            )
    return questions


def _problem_split(a: int, op: str, b: int) -> str:
    # `a plus b` and `b plus a` share a split: one must not give away the other.
    key = f"{min(a, b)} plus {max(a, b)}" if op == "plus" else f"{a} {op} {b}"
    return split_of(key, DEFAULT_FRACTIONS)


def _shuffled(
    task: str,
    split: str,
    index: int,
    context: str,
    right: str,
    wrong: list[str],
    rng: random.Random,
) -> McQuestion:
    label = rng.randrange(NUM_ENDINGS)
    endings = wrong[:label] + [right] + wrong[label:]
    return McQuestion(f"{task}-{split}-{index}", task, split, context, tuple(endings), label)


# --- records of HellaSwag and GSM8K --------------------------------------------------------


def _hellaswag_clean(text: str) -> str:
    """The preprocessing of lm-evaluation-harness: drop WikiHow `[title]`/`[step]` tags."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def hellaswag_record(row: Mapping[str, Any]) -> tuple[str, list[str], int] | None:
    """(context, endings, label) of a HellaSwag or project record; None when unlabelled."""
    if "context" in row:
        context = str(row["context"])
    elif "ctx_a" in row:
        ctx = f"{row['ctx_a']} {str(row.get('ctx_b', '')).capitalize()}".strip()
        context = f"{row['activity_label']}: {ctx}" if row.get("activity_label") else ctx
    elif "ctx" in row:
        context = str(row["ctx"])
    else:
        raise ValueError(
            f"a HellaSwag record needs `context`, `ctx` or `ctx_a`; keys: {sorted(row)}"
        )
    label = row.get("label")
    if label is None or label == "":
        return None  # HellaSwag's test split hides its labels
    endings = [_hellaswag_clean(str(e)) for e in row["endings"]]
    return _hellaswag_clean(context), endings, int(label)


_GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]+)\s*$")


def gsm8k_record(row: Mapping[str, Any]) -> tuple[str, int] | None:
    """(context, answer) of a GSM8K row; None when the answer is not an integer after `####`."""
    found = _GSM8K_ANSWER.search(str(row["answer"]).strip())
    if found is None:
        return None
    answer = int(found.group(1).replace(",", ""))
    return f"Question: {str(row['question']).strip()}\nAnswer:", answer


def _gsm8k_choices(
    records: list[tuple[str, int]], rng: random.Random
) -> list[tuple[str, list[str], int] | None]:
    """Each record's 4 endings: its answer and 3 other answers of the split (see
    `numeric_distractors`); None where the split has too few answers."""
    pool = [answer for _, answer in records]
    out: list[tuple[str, list[str], int] | None] = []
    for context, answer in records:
        near = numeric_distractors(answer, pool, rng)
        if near is None:
            out.append(None)
            continue
        label = rng.randrange(NUM_ENDINGS)
        wrong = [str(n) for n in near]
        out.append((context, wrong[:label] + [str(answer)] + wrong[label:], label))
    return out


def convert_rows(
    rows: Iterable[tuple[str, Mapping[str, Any]]], task: str, fmt: str, seed: int, caps: Caps
) -> tuple[list[McQuestion], dict[str, int]]:
    """(split, raw row) pairs -> questions, at most `caps[split]` per split (seeded sample)."""
    raw: dict[str, list[Any]] = {s: [] for s in SPLITS}
    skipped = 0
    for split, row in rows:
        record = hellaswag_record(row) if fmt == "hellaswag" else gsm8k_record(row)
        if record is None:
            skipped += 1
            continue
        raw[split].append(record)
    by_split: dict[str, list[tuple[str, list[str], int]]] = {}
    for split in SPLITS:
        if fmt == "hellaswag":
            by_split[split] = raw[split]
            continue
        choices = _gsm8k_choices(raw[split], random.Random(f"{seed}:{task}:{split}:choices"))
        skipped += sum(c is None for c in choices)
        by_split[split] = [c for c in choices if c is not None]
    questions: list[McQuestion] = []
    for split in SPLITS:
        records = by_split[split]
        keep = sorted(
            random.Random(f"{seed}:{task}:{split}").sample(
                range(len(records)), min(caps[split], len(records))
            )
        )
        for index, i in enumerate(keep):
            context, endings, label = records[i]
            questions.append(
                McQuestion(f"{task}-{split}-{index}", task, split, context, tuple(endings), label)
            )
    return questions, {"skipped_rows": skipped}


# --- readers ------------------------------------------------------------------------------


def load_hf_splits(path: str, config: str | None, revision: str | None) -> Mapping[str, Rows]:
    """All splits of a Hugging Face dataset; clear errors without `datasets` or offline."""
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(
            f"reading the Hugging Face dataset {path!r} needs the `datasets` library: "
            "`pip install datasets`. Or export it to JSONL and use `source: jsonl`, or run "
            "`make demo` (offline tiny profile, built-in tasks)."
        ) from err
    try:
        return datasets.load_dataset(path, config, revision=revision)
    except Exception as err:  # datasets raises many types (hub, network, config); all re-raised
        raise RuntimeError(
            f"cannot load the Hugging Face dataset {path!r} (config {config!r}, revision "
            f"{revision!r}): {err}\nOffline? Export the dataset to a JSONL file elsewhere and "
            "set `source: jsonl` with `path:` pointing at it, or run `make demo` for the "
            "offline tiny profile."
        ) from err


def hf_rows(splits: Mapping[str, Rows], path: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """Train from `train`; val and test halve `validation` (or `test`) by a hash of the row."""
    evaluation = next((name for name in ("validation", "test") if name in splits), None)
    if "train" not in splits or evaluation is None:
        raise ValueError(
            f"HF dataset {path!r} has splits {sorted(splits)}; expected `train` and "
            "`validation` or `test`"
        )
    for row in splits["train"]:
        yield "train", row
    for row in splits[evaluation]:
        yield split_of(json.dumps(dict(row), sort_keys=True, default=str), EVAL_HALVES), row


def jsonl_rows(path: Path) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """Rows of a local JSONL file with their split: a `split` field, else a hash of the row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice JSONL file not found: {path}")
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from None
            split = {"validation": "val"}.get(row.get("split"), row.get("split"))
            if split is None:
                split = split_of(line.strip(), DEFAULT_FRACTIONS)
            if split not in SPLITS:
                raise ValueError(f"{path}:{number}: split must be one of {SPLITS}, got {split!r}")
            yield split, row


def build_task(
    name: str,
    task: McTaskParams,
    params: McDataParams,
    concepts: pa.Table | None = None,
    hf_loader: HfLoader = load_hf_splits,
) -> tuple[list[McQuestion], dict[str, Any]]:
    """The questions of task `name` and its stats (counts per split, skipped rows, ...)."""
    caps = caps_of(params)
    stats: dict[str, Any] = {"source": task.source}
    if task.source == "category":
        if concepts is None:
            raise ValueError(f"mcdata.tasks.{name}: the category task needs the word list")
        questions, extra = category_questions(concepts, name, params.seed, caps)
        stats |= extra
    elif task.source == "arithmetic":
        questions = arithmetic_questions(name, params.seed, caps)
    else:
        assert task.path is not None  # McTaskParams checks it
        if task.source == "hf":
            rows = hf_rows(hf_loader(task.path, task.config, task.revision), task.path)
        else:
            rows = jsonl_rows(Path(task.path))
        try:
            questions, extra = convert_rows(rows, name, task.format, params.seed, caps)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(
                f"mcdata.tasks.{name} ({task.path}, format {task.format}): {err}"
            ) from err
        stats |= extra
    counts = Counter(q.split for q in questions)
    stats["questions"] = {split: counts[split] for split in SPLITS}
    empty = [split for split in SPLITS if counts[split] == 0]
    if empty:
        raise ValueError(
            f"mcdata.tasks.{name} ({task.source}) has no questions in {empty}: {stats}"
        )
    return questions, stats


def write_questions(path: Path, questions: Iterable[McQuestion]) -> None:
    with open(path, "w") as handle:
        for question in questions:
            handle.write(question.to_json() + "\n")


def read_questions(path: Path) -> list[McQuestion]:
    """Read and check a questions file (or the folder holding QUESTIONS_FILE)."""
    path = Path(path)
    if path.is_dir():
        path = path / QUESTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"questions not found: {path} (run the `mcdata` stage first)")
    questions = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
                questions.append(McQuestion(**(row | {"endings": tuple(row["endings"])})))
            except (json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
                raise ValueError(f"{path}:{number}: not a question record ({err})") from None
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions
