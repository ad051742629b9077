"""Multiple-choice data: the offline tasks, the HF / JSONL readers, the mcdata stage."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from pipeline.inputs.params import WordlistParams
from pipeline.inputs.words import concepts_table
from pipeline.steering_vectors import mcdata
from pipeline.steering_vectors.params import McDataParams, McTaskParams
from pipeline.steering_vectors.questions import (
    INITIAL_LABEL,
    McQuestion,
    arithmetic_questions,
    build_task,
    category_questions,
    load_hf_splits,
    number_words,
    read_questions,
)
from tests.conftest import build_params

CAPS = {"train": 1000, "val": 1000, "test": 1000}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def word_table(words: list[str], categories: list[str | None] | None = None) -> pa.Table:
    params = WordlistParams(source="wordfreq", num_concepts=len(words))
    tags = [(None, c) for c in categories] if categories else [(None, None)] * len(words)
    return concepts_table([(w, i) for i, w in enumerate(words)], tags, params)


def synthetic_words(count: int = 600) -> list[str]:
    return [f"{LETTERS[i % 26]}{LETTERS[(i // 26) % 26]}word{i}" for i in range(count)]


def by_split(questions: list[McQuestion]) -> dict[str, list[McQuestion]]:
    return {s: [q for q in questions if q.split == s] for s in ("train", "val", "test")}


def test_number_words():
    assert [number_words(n) for n in (0, 13, 20, 42, 99)] == [
        "zero",
        "thirteen",
        "twenty",
        "forty-two",
        "ninety-nine",
    ]
    with pytest.raises(ValueError, match="0..99"):
        number_words(100)


def test_arithmetic_answers_are_right_and_splits_disjoint():
    questions = arithmetic_questions("math", seed=0, caps=CAPS)
    words = {number_words(n): n for n in range(100)}
    keys: dict[str, set[str]] = {}
    for q in questions:
        a, op, b, _ = q.context.split()
        expected = words[a] + words[b] if op == "plus" else words[a] - words[b]
        assert words[q.endings[q.label]] == expected
        assert len(set(q.endings)) == 4
        pair = f"{min(words[a], words[b])}+{max(words[a], words[b])}" if op == "plus" else q.context
        keys.setdefault(pair, set()).add(q.split)
    assert all(len(splits) == 1 for splits in keys.values()), "a problem sits in two splits"
    counts = {s: len(qs) for s, qs in by_split(questions).items()}
    assert counts["train"] > 3 * counts["val"] > 0 and counts["test"] > 0
    assert questions == arithmetic_questions("math", seed=0, caps=CAPS)
    assert questions != arithmetic_questions("math", seed=1, caps=CAPS)
    labels = {q.label for q in questions}
    assert labels == {0, 1, 2, 3}


def test_category_without_wordnet_uses_the_initial_letter_and_split_words():
    table = word_table(synthetic_words())
    questions, stats = category_questions(table, "cat", seed=0, caps={**CAPS, "train": 50})
    assert stats["categories"] == "initial_letter"
    split_of = dict(zip(table["text"].to_pylist(), table["split"].to_pylist(), strict=True))
    for q in questions:
        assert INITIAL_LABEL in q.context
        right = q.endings[q.label]
        assert "a" <= right[0] <= "m"
        assert all(e[0] > "m" for i, e in enumerate(q.endings) if i != q.label)
        assert {split_of[e] for e in q.endings} == {q.split}, "a word from another split"
    counts = {s: len(qs) for s, qs in by_split(questions).items()}
    assert counts["train"] == 50 and counts["val"] > 10 and counts["test"] > 10
    # One question per target word: no word is the answer twice.
    answers = [q.endings[q.label] for q in questions]
    assert len(answers) == len(set(answers))


def test_category_with_wordnet_names_the_lexname():
    words = synthetic_words(400)
    lexnames = ["noun.animal", "noun.food", "verb.motion", None]
    table = word_table(words, [lexnames[i % 4] for i in range(len(words))])
    category = dict(zip(words, [lexnames[i % 4] for i in range(len(words))], strict=True))
    questions, stats = category_questions(table, "cat", seed=0, caps=CAPS)
    assert stats["categories"] == "wordnet"
    for q in questions:
        right = category[q.endings[q.label]]
        pos, name = right.split(".")
        assert f'"{name} ({pos})"' in q.context
        assert all(
            category[e] not in (right, None) for i, e in enumerate(q.endings) if i != q.label
        )


HELLASWAG_ROWS = [
    {
        "activity_label": "Baking",
        "ctx_a": f"A man mixes flour {i}.",
        "ctx_b": "he",
        "endings": [f"bakes [title] bread {i}.", "sings.", "runs.", "flies."],
        "label": "0",
    }
    for i in range(40)
]


def fake_loader(splits):
    def load(path, config, revision):
        assert (path, config, revision) == ("org/hellaswag", None, None)
        return splits

    return load


def test_hf_hellaswag_rows_convert_and_split(tmp_path):
    splits = {
        "train": HELLASWAG_ROWS[:20],
        "validation": HELLASWAG_ROWS[20:],
        "test": [{**HELLASWAG_ROWS[0], "label": ""}],  # hidden labels: not read
    }
    params = McDataParams(tasks={"hs": McTaskParams("hf", "org/hellaswag")}, max_train=15)
    questions, stats = build_task("hs", params.tasks["hs"], params, hf_loader=fake_loader(splits))
    parts = by_split(questions)
    assert len(parts["train"]) == 15 and len(parts["val"]) + len(parts["test"]) == 20
    assert parts["val"] and parts["test"]
    first = parts["train"][0]
    assert first.context.startswith("Baking: A man mixes flour") and first.context.endswith("He")
    assert first.endings[0].startswith("bakes. bread") and first.label == 0
    assert stats["questions"]["train"] == 15 and stats["skipped_rows"] == 0


def test_gsm8k_rows_get_the_number_and_three_distractors():
    rows = [
        {"question": f"Tom has {i} apples and buys 3. How many?", "answer": f"... #### {i + 3}"}
        for i in range(30)
    ]
    rows.append({"question": "Bad row?", "answer": "no number here"})
    task = McTaskParams("hf", "org/gsm8k", config="main", format="gsm8k")
    params = McDataParams(tasks={"math": task})

    def load(path, config, revision):
        return {"train": rows, "test": rows[:20]}

    questions, stats = build_task("math", task, params, hf_loader=load)
    assert stats["skipped_rows"] == 1
    for q in questions:
        asked = int(q.context.split("has ")[1].split(" ")[0])
        assert q.endings[q.label] == str(asked + 3)
        assert len(set(q.endings)) == 4 and q.context.endswith("Answer:")


def test_hf_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(RuntimeError, match="(?s)pip install datasets.*jsonl.*make demo"):
        load_hf_splits("Rowan/hellaswag", None, None)


def test_hf_offline_names_the_local_jsonl_option(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(
        RuntimeError, match="(?s)Rowan/hellaswag.*Offline.*source: jsonl.*make demo"
    ):
        load_hf_splits("Rowan/hellaswag", None, None)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_local_jsonl_keeps_its_splits_and_names_bad_lines(tmp_path):
    rows = [
        {"context": f"Context {i}", "endings": ["a", "b", "c", "d"], "label": i % 4, "split": s}
        for i, s in enumerate(["train"] * 6 + ["validation"] * 3 + ["test"] * 3)
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    task = McTaskParams("jsonl", str(path))
    params = McDataParams(tasks={"local": task})
    questions, _ = build_task("local", task, params)
    assert {s: len(q) for s, q in by_split(questions).items()} == {"train": 6, "val": 3, "test": 3}
    assert [q.label for q in by_split(questions)["train"]] == [0, 1, 2, 3, 0, 1]

    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"mc\.jsonl:13: not JSON"):
        build_task("local", task, params)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "endings": ["a", "b"]}])
    with pytest.raises(ValueError, match="mcdata.tasks.local.*4 non-empty endings"):
        build_task("local", McTaskParams("jsonl", str(bad)), params)


def test_mcdata_stage_cli_writes_questions_and_stats(tmp_path):
    wordlist = tmp_path / "concepts.parquet"
    pq.write_table(word_table(synthetic_words()), wordlist)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        "mcdata: {tasks: {cat: {source: category}, math: {source: arithmetic}}, max_train: 40}\n"
        "steering: {keywords: {math: [plus]}}\n"
    )
    app = typer.Typer()
    app.command()(mcdata.command)
    out = tmp_path / "mcdata"
    result = CliRunner().invoke(
        app, ["--params", str(params_file), "--wordlist", str(wordlist), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    questions = read_questions(out)
    assert {q.task for q in questions} == {"cat", "math"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["cat"]["questions"]["train"] == 40 and stats["math"]["questions"]["train"] == 40
    assert sum(stats["cat"]["questions"].values()) == sum(q.task == "cat" for q in questions)


def test_mcdata_refuses_an_empty_split_before_writing(tmp_path):
    rows = [{"context": "c", "endings": ["a", "b", "c", "d"], "label": 0, "split": "train"}]
    path = write_jsonl(tmp_path / "train_only.jsonl", rows)
    params = McDataParams(tasks={"local": McTaskParams("jsonl", str(path))})
    with pytest.raises(
        ValueError, match=r"mcdata.tasks.local \(jsonl\) has no questions in \['val'"
    ):
        mcdata.run(params, tmp_path / "unused.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_wordlist_and_questions_are_named(tmp_path):
    params = McDataParams(tasks={"cat": McTaskParams("category")})
    with pytest.raises(FileNotFoundError, match="concepts.parquet"):
        mcdata.run(params, tmp_path / "concepts.parquet", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="run the `mcdata` stage"):
        read_questions(tmp_path / "nowhere")


def test_params_validation_names_the_key():
    with pytest.raises(ValueError, match="mcdata.tasks.x.*needs a path"):
        build_params(mcdata={"tasks": {"x": {"source": "hf"}}}, steering={"keywords": {}})
    with pytest.raises(ValueError, match="mcdata.tasks.x.*takes no path"):
        build_params(mcdata={"tasks": {"x": {"source": "arithmetic", "path": "a.jsonl"}}})
    with pytest.raises(ValueError, match=r"steering.keywords names \['nope'\]"):
        build_params(steering={"keywords": {"nope": ["x"]}})
    with pytest.raises(ValueError, match="mcdata.max_val must be > 0"):
        build_params(mcdata={"max_val": 0})
    with pytest.raises(ValueError, match="steering.alphas must lie in"):
        build_params(steering={"alphas": [1.5]})
    with pytest.raises(ValueError, match="unknown key 'steering.lyers'"):
        build_params(steering={"lyers": [1]})
    params = build_params(steering={"layers": [0, 9]})
    with pytest.raises(ValueError, match=r"steering.layers holds \[9\].*4 decoder layers"):
        params.steering.depth_layers(4)
    assert build_params().steering.depth_layers(28) == ((2, 14, 22), (2, 14, 22))
    every = build_params(steering={"single_layers": "all"}).steering.depth_layers(5)
    assert every == ((0, 2, 4), (0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match="steering.single_layers"):
        build_params(steering={"single_layers": "most"})
