"""The `wordlist` stage: filters, stable splits, selection errors, schema, NLTK offline path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nltk
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from pipeline.common.params import load_params
from pipeline.common.splits import SplitFractions, split_of
from pipeline.inputs import wordlist, words
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.words import COLUMNS, SCHEMA, filter_words, read_concepts


def build_cfg(**overrides) -> WordlistParams:
    return WordlistParams(**{"source": "wordfreq", "num_concepts": 200, **overrides})


class FakeSynset:
    def __init__(self, pos: str, lexname: str) -> None:
        self._pos, self._lexname = pos, lexname

    def pos(self) -> str:
        return self._pos

    def lexname(self) -> str:
        return self._lexname


FAKE_WORDNET = SimpleNamespace(
    synsets=lambda word: {
        "dog": [FakeSynset("n", "noun.animal"), FakeSynset("v", "verb.motion")],
        "run": [FakeSynset("v", "verb.motion")],
        "happy": [FakeSynset("s", "adj.all")],
        "quickly": [FakeSynset("r", "adv.all")],
    }.get(word, [])
)


def test_filters_drop_and_count_each_reason():
    ranked = [
        ("the", 0),
        ("The", 1),
        ("it's", 2),
        ("café", 3),
        ("a", 4),
        ("x" * 21, 5),
        ("dog", 6),
        ("DOG", 7),
        ("Apple", 8),
        ("apple", 9),
        ("b2b", 10),
        ("zebra", 11),
    ]
    kept, dropped = filter_words(ranked, min_length=3, max_length=20)
    assert kept == [("the", 0), ("dog", 6), ("apple", 8), ("zebra", 11)]
    assert dropped == {"non_alpha": 3, "too_short": 1, "too_long": 1, "duplicate": 3}


def test_filters_keep_the_best_rank_whatever_the_input_order():
    kept, dropped = filter_words([("Cat", 5), ("cat", 2), ("cow", 3)], 3, 20)
    assert kept == [("cat", 2), ("cow", 3)]
    assert dropped["duplicate"] == 1


def test_split_depends_only_on_text_and_salt():
    fractions = SplitFractions()
    vocab = [f"word{i}" for i in range(300)]
    before = {w: split_of(w, fractions) for w in vocab[:100]}
    after = {w: split_of(w, fractions) for w in vocab}
    assert all(after[w] == split for w, split in before.items())
    assert {split_of(w, fractions, salt="other") for w in vocab[:100]} == {"train", "val", "test"}
    assert [split_of(w, fractions, "other") for w in vocab] != [after[w] for w in vocab]


def test_split_fractions_are_roughly_70_15_15():
    fractions = SplitFractions()
    splits = [split_of(f"concept{i}", fractions) for i in range(5000)]
    assert splits.count("train") / 5000 == pytest.approx(0.70, abs=0.03)
    assert splits.count("val") / 5000 == pytest.approx(0.15, abs=0.03)
    assert splits.count("test") / 5000 == pytest.approx(0.15, abs=0.03)


def test_growing_num_concepts_keeps_existing_splits(tmp_path):
    small = wordlist.run(build_cfg(num_concepts=200), tmp_path / "small")
    large = wordlist.run(build_cfg(num_concepts=400), tmp_path / "large")
    a = pq.read_table(tmp_path / "small" / "concepts.parquet")
    b = pq.read_table(tmp_path / "large" / "concepts.parquet").slice(0, 200)
    assert a.column("text").to_pylist() == b.column("text").to_pylist()
    assert a.column("split").to_pylist() == b.column("split").to_pylist()
    assert (small["total"], large["total"]) == (200, 400)


def test_stage_writes_exact_schema_and_stats(tmp_path):
    out = tmp_path / "wordlist"
    stats = wordlist.run(build_cfg(num_concepts=300), out)
    table = pq.read_table(out / "concepts.parquet")
    assert table.schema.names == list(COLUMNS)
    assert [f.type for f in table.schema] == [
        pa.int64(),
        pa.string(),
        pa.string(),
        pa.string(),
        pa.string(),
        pa.string(),
        pa.int64(),
    ]
    assert table.column("id").to_pylist() == list(range(300))
    ranks = table.column("freq_rank").to_pylist()
    assert ranks == sorted(ranks) and ranks[0] == 0  # "the" is wordfreq's top word
    texts = table.column("text").to_pylist()
    assert texts[0] == "the" and len(set(texts)) == 300
    assert all(t.isascii() and t.isalpha() and t.islower() and 3 <= len(t) <= 20 for t in texts)
    assert set(table.column("source").to_pylist()) == {"wordfreq"}
    assert table.column("pos").null_count == 300
    assert json.loads((out / "stats.json").read_text()) == stats
    assert sum(stats["splits"].values()) == 300 and stats["dropped"]["too_short"] > 0
    assert read_concepts(out).equals(table)


def test_too_many_concepts_fails_before_writing(tmp_path):
    out = tmp_path / "wordlist"
    with pytest.raises(ValueError, match=r"wordlist\.num_concepts=2000000 .* only \d+ words"):
        wordlist.run(build_cfg(num_concepts=2_000_000), out)
    assert not out.exists()


def test_empty_after_filtering_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(words, "wordfreq_ranked", lambda: [("it's", 0), ("a", 1), ("42", 2)])
    out = tmp_path / "wordlist"
    with pytest.raises(ValueError, match=r"empty after filtering.*'wordfreq'.*min_length=3"):
        wordlist.run(build_cfg(), out)
    assert not out.exists()


@pytest.mark.parametrize("failure", ["returns_false", "raises"])
def test_nltk_offline_names_the_way_out(tmp_path, monkeypatch, failure):
    def fake_download(*args, **kwargs):
        if failure == "raises":
            raise ValueError("Error loading words: <urlopen error no network>")
        return False

    monkeypatch.setattr(nltk, "download", fake_download)
    out = tmp_path / "wordlist"
    with pytest.raises(RuntimeError, match="could not be downloaded") as info:
        wordlist.run(build_cfg(source="nltk"), out)
    assert "wordlist.source: wordfreq" in str(info.value) and "make demo" in str(info.value)
    assert str(out / "nltk_data") in str(info.value)
    assert not (out / "concepts.parquet").exists()


def test_wordnet_tags_map_pos_and_lexname():
    tags = words.wordnet_tags(["dog", "run", "happy", "quickly", "xyzzy"], FAKE_WORDNET)
    assert tags == [
        ("noun", "noun.animal"),
        ("verb", "verb.motion"),
        ("adj", "adj.all"),
        ("adv", "adv.all"),
        (None, None),
    ]


def test_nltk_source_ranks_by_frequency_and_tags(tmp_path, monkeypatch):
    corpus = ["xyzzy", "Dog", "dog", "run", "happy", "a", "quickly", "the"]
    monkeypatch.setattr(words, "load_nltk", lambda folder: (corpus, FAKE_WORDNET))
    table, stats = words.build_concepts(build_cfg(source="nltk", num_concepts=6), tmp_path / "nltk")
    rows = table.to_pylist()
    assert [r["text"] for r in rows] == ["the", "run", "happy", "dog", "quickly", "xyzzy"]
    assert [r["pos"] for r in rows] == [None, "verb", "adj", "noun", "adv", None]
    assert rows[3]["category"] == "noun.animal"
    assert [r["id"] for r in rows] == list(range(6))
    assert {r["source"] for r in rows} == {"nltk"}
    assert stats["without_synset"] == 2 and stats["dropped"]["duplicate"] == 1


def test_rank_by_frequency_breaks_ties_by_text():
    ranked = words.rank_by_frequency(["zzqx", "the", "qqzx"])
    assert ranked == [("the", 0), ("qqzx", 1), ("zzqx", 2)]


def test_read_concepts_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="concepts.parquet"):
        read_concepts(tmp_path / "concepts.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [0], "text": ["dog"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*missing columns \['split'"):
        read_concepts(bad)
    assert SCHEMA.names == list(COLUMNS)


def test_command_reads_params_and_writes_table_and_stats(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("wordlist:\n  source: wordfreq\n  num_concepts: 50\n")
    app = typer.Typer()
    app.command()(wordlist.command)
    out = tmp_path / "wordlist"
    result = CliRunner().invoke(app, ["--params", str(params), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_concepts(out).num_rows == 50
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"] == sum(stats["splits"].values()) == 50 and stats["source"] == "wordfreq"
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "Build the concept list" in help_text and "--out" in help_text


def test_split_by_stem_puts_every_inflection_of_a_stem_in_one_split():
    vocab = [text for text, _ in words.wordfreq_ranked()[:3000] if text.isalpha()]
    by_stem: dict[str, set[str]] = {}
    for text, stem in zip(vocab, words.stems(vocab), strict=True):
        by_stem.setdefault(stem, set()).add(text)
    groups = [group for group in by_stem.values() if len(group) > 1]
    assert len(groups) > 100 and {"year", "years"} in groups

    def split_sets(split_by: str) -> list[set[str]]:
        splits = dict(zip(vocab, words.split_keys(vocab, split_by), strict=True))
        return [{split_of(splits[t], SplitFractions()) for t in group} for group in groups]

    assert all(len(s) == 1 for s in split_sets("stem"))
    assert sum(len(s) > 1 for s in split_sets("text")) > 20  # text splits scatter stems


def test_stem_leak_counts_test_words_whose_stem_is_in_train():
    texts = ["year", "years", "look", "looks", "river"]
    assert words.stem_leak(texts, ["train", "test", "test", "val", "test"]) == 1 / 3
    assert words.stem_leak(texts, ["test", "test", "train", "train", "val"]) == 0.0
    assert words.stem_leak(texts, ["train"] * 5) == 0.0


def test_stats_record_split_by_and_the_stem_leak(tmp_path):
    by_text = wordlist.run(build_cfg(num_concepts=1000), tmp_path / "text")
    by_stem = wordlist.run(build_cfg(num_concepts=1000, split_by="stem"), tmp_path / "stem")
    assert by_text["split_by"] == "text" and by_stem["split_by"] == "stem"
    assert by_stem["test_sharing_train_stem"] == 0.0
    assert by_text["test_sharing_train_stem"] > 0.05
    assert sum(by_stem["splits"].values()) == 1000


def test_split_by_rejects_an_unknown_mode(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("wordlist:\n  source: wordfreq\n  split_by: lemma\n")
    with pytest.raises(ValueError, match="split_by"):
        load_params(path, wordlist=WordlistParams)
