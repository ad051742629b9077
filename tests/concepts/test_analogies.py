"""The analogy set: pair finder, split rule, stage; 3CosAdd and only-c on planted spaces;
the auxiliary analogy loss in training; the evaluate stage's analogy columns."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.concepts import analogies, distill
from pipeline.concepts.analogies import build_analogies, derived_forms, suffix_pairs
from pipeline.concepts.analogy_set import (
    SCHEMA,
    AnalogySet,
    analogy_scores,
    analogy_split,
    only_c,
    three_cos_add,
)
from pipeline.concepts.evaluate import run as evaluate_run
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import AnalogiesParams
from pipeline.inputs.words import SCHEMA as CONCEPT_SCHEMA
from tests.concepts.test_evaluate import SECTIONS, stage_paths, write_run
from tests.conftest import build_params, make_direction_set

WORDS = [
    "walk", "walked", "walking", "walks", "jump", "jumped", "jumping", "jumps",
    "big", "bigger", "biggest", "small", "smaller", "smallest", "make", "making",
    "bake", "baked", "stop", "stopped", "city", "cities", "happy", "happily",
    "quick", "quickly", "simple", "simply", "hope", "hoped", "hop", "bed", "red",
    "numb", "number", "new", "news", "try", "tried", "run", "running", "die", "dying",
]  # fmt: skip


def pairs(suffix: str, words=WORDS, min_base_length: int = 3) -> set[tuple[str, str]]:
    return set(suffix_pairs(words, suffix, min_base_length))


def test_derived_forms_follow_the_spelling_rules():
    assert derived_forms("walk", "ed") == ["walked"]
    assert derived_forms("bake", "ed") == ["baked"]  # e: only d
    assert derived_forms("make", "ing") == ["making"]  # e-drop
    assert derived_forms("see", "ing") == ["seeing"]  # no drop after ee
    assert derived_forms("die", "ing") == ["dying"]
    assert derived_forms("stop", "ed") == ["stopped"]  # one vowel: always doubled
    assert derived_forms("big", "er") == ["bigger"]
    assert derived_forms("visit", "ed") == ["visited", "visitted"]  # stress decides
    assert derived_forms("try", "ed") == ["tried"]  # y -> i after a consonant
    assert derived_forms("play", "ed") == ["played"]  # not after a vowel
    assert derived_forms("city", "s") == ["cities"]
    assert derived_forms("box", "s") == ["boxes"]
    assert derived_forms("happy", "ly") == ["happily"]
    assert derived_forms("simple", "ly") == ["simply"]
    assert derived_forms("snow", "ing") == ["snowing"]  # w is never doubled


def test_pair_finder_finds_the_regular_pairs():
    assert {("walk", "walked"), ("jump", "jumped"), ("stop", "stopped")} <= pairs("ed")
    assert {("bake", "baked"), ("hope", "hoped"), ("try", "tried")} <= pairs("ed")
    assert {("make", "making"), ("run", "running"), ("die", "dying")} <= pairs("ing")
    assert {("big", "bigger"), ("small", "smaller")} <= pairs("er")
    assert {("big", "biggest"), ("small", "smallest")} <= pairs("est")
    assert {("city", "cities"), ("walk", "walks")} <= pairs("s")
    assert {("happy", "happily"), ("quick", "quickly"), ("simple", "simply")} <= pairs("ly")


def test_pair_finder_rejects_spurious_pairs():
    everything = set().union(*(pairs(s) for s in ("s", "ed", "ing", "er", "est", "ly")))
    derived = {b for _, b in everything}
    assert "bed" not in derived and "red" not in derived  # never b + ed, r + ed
    assert ("hop", "hoped") not in everything  # hop doubles: hopped
    assert ("numb", "number") not in everything  # no "numbest": not a comparative
    assert ("new", "news") not in everything  # their stems differ
    # Even with one-letter bases allowed, the stem check keeps "bed" out.
    assert ("b", "bed") not in pairs("ed", ["b", *WORDS], min_base_length=1)
    # Must fail: with the superlative gone, big:bigger is no longer a comparative.
    assert ("big", "bigger") not in pairs("er", [w for w in WORDS if w != "biggest"])


@pytest.mark.parametrize(
    ("splits", "expected"),
    [
        (["train"] * 4, "train"),
        (["train", "val", "train", "train"], "val"),
        (["val"] * 4, "val"),
        (["train", "train", "train", "test"], "test"),
        (["val", "test", "train", "val"], "test"),
    ],
)
def test_analogy_split_goes_with_the_concepts(splits, expected):
    assert analogy_split(splits) == expected


def test_analogy_split_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        analogy_split(["train", "dev", "train", "train"])


def concept_table(words: list[str], splits: list[str], source: str = "wordfreq") -> pa.Table:
    n = len(words)
    columns = {
        "id": list(range(n)),
        "text": words,
        "split": splits,
        "source": [source] * n,
        "pos": [None] * n,
        "category": [None] * n,
        "freq_rank": list(range(n)),
    }
    return pa.Table.from_pydict(columns, schema=CONCEPT_SCHEMA)


def split_cycle(n: int) -> list[str]:
    return [("train", "train", "val", "test")[i % 4] for i in range(n)]


def test_build_analogies_caps_seeds_and_splits(tmp_path):
    concepts = concept_table(WORDS, split_cycle(len(WORDS)))
    params = AnalogiesParams(wordnet=(), max_per_relation=5, seed=1)
    table, stats = build_analogies(concepts, params)
    rows = table.to_pylist()
    split_of = dict(zip(WORDS, split_cycle(len(WORDS)), strict=True))
    for row in rows:
        words = [row[k] for k in "abcd"]
        assert len(set(words)) == 4  # two pairs sharing no word
        assert [row[f"{k}_id"] for k in "abcd"] == [WORDS.index(w) for w in words]
        assert row["split"] == analogy_split([split_of[w] for w in words])
    per_relation = {r: sum(v["analogies"].values()) for r, v in stats["relations"].items()}
    assert per_relation["+ed"] == 5  # capped: 7 pairs give 42 ordered pairs of pairs
    assert per_relation["+er"] == 2  # big/small: both orders
    assert stats["total"] == len(rows) == sum(per_relation.values())
    again, _ = build_analogies(concepts, params)
    other, _ = build_analogies(concepts, AnalogiesParams(wordnet=(), max_per_relation=5, seed=2))
    assert again.equals(table)
    assert not other.equals(table)  # the seed picks the sample


def write_concepts(folder: Path, table: pa.Table) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "concepts.parquet")
    return folder


def test_stage_skips_wordnet_for_wordfreq_and_fails_fast_without_it(tmp_path):
    wordlist = write_concepts(tmp_path / "wl", concept_table(WORDS, split_cycle(len(WORDS))))
    stats = analogies.run(AnalogiesParams(max_per_relation=50), wordlist, tmp_path / "out")
    assert stats["skipped"] == ["antonym", "derivation"]
    written = AnalogySet.read(tmp_path / "out" / "analogies.parquet")
    assert len(written) == stats["total"] > 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["word_source"] == "wordfreq"
    nltk = write_concepts(tmp_path / "nltk", concept_table(WORDS, ["train"] * len(WORDS), "nltk"))
    with pytest.raises(FileNotFoundError, match="WordNet not found under .*nltk_data"):
        analogies.run(AnalogiesParams(), nltk, tmp_path / "out2")


class FakeLemma:
    def __init__(self, name, pos, antonyms=(), derived=()):
        self._name, self._pos, self._antonyms, self._derived = name, pos, antonyms, derived

    def name(self):
        return self._name

    def synset(self):
        return type("Synset", (), {"pos": lambda _: self._pos})()

    def antonyms(self):
        return [FakeLemma(n, self._pos) for n in self._antonyms]

    def derivationally_related_forms(self):
        return [FakeLemma(n, pos) for n, pos in self._derived]


class FakeWordNet:
    LEMMAS = {
        "hot": [FakeLemma("hot", "a", antonyms=["cold"])],
        "cold": [FakeLemma("cold", "a", antonyms=["hot"])],
        "decide": [FakeLemma("decide", "v", derived=[("decision", "n"), ("decisive", "a")])],
        "decision": [FakeLemma("decision", "n", derived=[("decide", "v")])],
    }

    def lemmas(self, word):
        return self.LEMMAS.get(word, [])


def test_wordnet_pairs_known_answers():
    words = ["cold", "hot", "decide", "decision", "decisive"]
    assert analogies.wordnet_pairs(words, "antonym", FakeWordNet()) == [("cold", "hot")]
    assert analogies.wordnet_pairs(words, "derivation", FakeWordNet()) == [("decide", "decision")]


def analogy_set(quads: list[tuple[int, int, int, int]], split: str = "test") -> AnalogySet:
    return AnalogySet(torch.tensor(quads), ("r",) * len(quads), (split,) * len(quads))


def planted(num_pairs: int = 12, dim: int = 32, offset: float = 1.0, seed: int = 0):
    """Unit bases x_i (rows 0..P-1) orthogonal to the relation r = the last axis; derived
    words x_i + offset * r (rows P..2P-1); and a near neighbour of each base (rows
    2P..3P-1), closer to it than its derived word: only-c picks the neighbour."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    base = unit(
        torch.cat([torch.randn(num_pairs, dim - 1, generator=gen), torch.zeros(num_pairs, 1)], 1),
        dim=1,
    )
    relation = torch.zeros(dim)
    relation[-1] = 1.0
    noise = unit(
        torch.cat([torch.randn(num_pairs, dim - 1, generator=gen), torch.zeros(num_pairs, 1)], 1),
        dim=1,
    )
    vectors = torch.cat([base, base + offset * relation, base + 0.3 * noise])
    quads = [
        (i, num_pairs + i, j, num_pairs + j)
        for i in range(num_pairs)
        for j in range(num_pairs)
        if i != j
    ]
    return vectors, quads


def test_three_cos_add_solves_a_planted_analogy_set_and_only_c_does_not():
    vectors, quads = planted()
    scores = analogy_scores(vectors, analogy_set(quads))
    assert scores["test_3cosadd"] == 1.0
    assert scores["test_only_c"] == 0.0  # c's neighbour is nearer than d: the offset answers
    assert scores["val_3cosadd"] is None  # no val analogies
    assert scores["relations"]["r"]["test_3cosadd"] == 1.0


def test_three_cos_add_is_at_chance_on_shuffled_answers():
    vectors, quads = planted()
    gen = torch.Generator().manual_seed(1)
    derived = torch.tensor([d for *_, d in quads])
    shuffled = derived[torch.randperm(derived.numel(), generator=gen)]
    wrong = [(a, b, c, int(d)) for (a, b, c, _), d in zip(quads, shuffled, strict=True)]
    # Must fail: the answers no longer follow the offset.
    assert analogy_scores(vectors, analogy_set(wrong))["test_3cosadd"] < 0.2


def test_three_cos_add_excludes_the_question_words():
    vectors, quads = planted(offset=0.0)  # b = a: the query is c itself
    a, b, c, d = torch.tensor(quads).unbind(1)
    assert bool((three_cos_add(vectors, a, b, c, exclude=False) == c).all())
    assert bool((three_cos_add(vectors, a, b, c) == d).all())


def test_only_c_scores_one_where_d_is_the_nearest_neighbour_of_c():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(10, 32, generator=gen)
    near = base + 0.05 * torch.randn(10, 32, generator=gen)  # no shared offset at all
    vectors = torch.cat([base, near])
    quads = [(i, 10 + i, j, 10 + j) for i in range(10) for j in range(10) if i != j]
    a, b, c, d = torch.tensor(quads).unbind(1)
    assert bool((only_c(vectors, a, b, c) == d).all())
    assert analogy_scores(vectors, analogy_set(quads))["test_only_c"] == 1.0


def write_analogies(path: Path, quads: list[tuple[int, int, int, int]], splits: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {f"{k}_id": [q[i] for q in quads] for i, k in enumerate("abcd")}
    columns |= {k: [f"w{q[i]}" for q in quads] for i, k in enumerate("abcd")}
    columns |= {"relation": ["+x"] * len(quads), "split": splits}
    pq.write_table(pa.Table.from_pydict(columns, schema=SCHEMA), path)
    return path


def data_analogies(folder: Path, data: DirectionSet) -> Path:
    """Analogies over the direction set's concepts, split with them."""
    split_of = {}
    for split in ("train", "val", "test"):
        for concept in data.load_split(split)[0].tolist():
            split_of[concept] = split
    quads = [(i, i + 1, i + 2, i + 3) for i in range(0, 200, 4)]
    splits = [analogy_split([split_of[w] for w in q]) for q in quads]
    assert "train" in splits and "test" in splits
    return write_analogies(folder / "analogies.parquet", quads, splits)


FAST = {"layer": 2, "epochs": 2, "batch_size": 32, "lr": 0.01, "buffer_rows": 64}


def test_aux_weight_zero_trains_bit_identically_and_a_positive_one_does_not(
    direction_set, tmp_path
):
    data = DirectionSet(direction_set, 2)
    path = data_analogies(tmp_path / "analogies", data)
    frozen = {"approach": "frozen_mlp", "hidden_dim": 8}
    runs = {"plain": frozen, "zero": frozen | {"analogy_weight": 0.0}}
    aux = {"aux": frozen | {"analogy_weight": 1.0}}
    params = build_params(
        directions={"layers": [2]}, distill={"train": FAST, "runs": runs, "analogy_runs": aux}
    )
    weights = {}
    for name in [*runs, *aux]:
        out = tmp_path / name
        given = None if name == "plain" else path
        distill.run(params, name, direction_set, out, tmp_path / "live" / name, given)
        weights[name] = load_file(out / "seeds" / "0" / "model.safetensors")
    assert weights["zero"].keys() == weights["plain"].keys()
    for key in weights["plain"]:
        assert torch.equal(weights["zero"][key], weights["plain"][key])
    assert not all(torch.equal(weights["aux"][k], weights["plain"][k]) for k in weights["plain"])
    with pytest.raises(ValueError, match="distill.analogy_runs.aux.analogy_weight=1.0 needs"):
        distill.run(params, "aux", direction_set, tmp_path / "x", tmp_path / "live" / "x")


def test_aux_loss_refuses_analogies_on_held_out_concepts(direction_set, tmp_path):
    data = DirectionSet(direction_set, 2)
    test_ids = data.load_split("test")[0][:4].tolist()
    path = write_analogies(tmp_path / "a.parquet", [tuple(test_ids)], ["train"])
    aux = {"aux": {"approach": "linear_probe", "analogy_weight": 0.5}}
    runs = {"plain": {"approach": "linear_probe"}}
    params = build_params(
        directions={"layers": [2]}, distill={"train": FAST, "runs": runs, "analogy_runs": aux}
    )
    with pytest.raises(ValueError, match="not train concepts"):
        distill.run(params, "aux", direction_set, tmp_path / "o", tmp_path / "l", path)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"analogies": {"suffixes": ["s", "xyz"]}}, "analogies.suffixes"),
        ({"analogies": {"max_per_relation": 0}}, "analogies.max_per_relation must be > 0"),
        ({"analogies": {"wordnet": ["antonym", "antonym"]}}, "analogies.wordnet repeats"),
        ({"analogies": {"suffixes": [], "wordnet": []}}, "both empty"),
        (
            {"distill": {"runs": {"aux": {"approach": "linear_probe", "analogy_weight": -1}}}},
            "distill.runs.aux: analogy_weight must be >= 0, got -1",
        ),
        (
            {"distill": {"runs": {"aux": {"approach": "linear_probe", "analogy_weight": 0.5}}}},
            "distill.runs.aux.analogy_weight=0.5: a run with the auxiliary analogy loss goes "
            "under distill.analogy_runs",
        ),
        (
            {"distill": {"analogy_runs": {"a": {"approach": "linear_probe"}}}},
            r"distill.analogy_runs.a.analogy_weight must be > 0, got 0.0",
        ),
        (
            {
                "distill": {
                    "runs": {"a": {"approach": "linear_probe"}},
                    "analogy_runs": {"a": {"approach": "linear_probe", "analogy_weight": 1.0}},
                }
            },
            r"distill.runs and distill.analogy_runs both name \['a'\]",
        ),
    ],
)
def test_bad_params_name_their_key(section, message):
    with pytest.raises(ValueError, match=message):
        build_params(**section)


def test_evaluate_scores_every_space_and_the_teacher(tmp_path):
    directions = make_direction_set(tmp_path / "directions", vocab_size=400, layer=2)
    data = DirectionSet(directions, 2)
    distill_dir = tmp_path / "distill"
    write_run(distill_dir, "linear_probe", data, exact=True, seeds=(0, 1))
    write_run(distill_dir, "tiny", data, seeds=(0, 1))
    path = data_analogies(tmp_path / "analogies", data)
    paths = stage_paths(tmp_path)
    results = evaluate_run(
        build_params(**SECTIONS), directions, distill_dir, **paths, analogies=path
    )
    analogy_set_ = AnalogySet.read(path)
    teacher = torch.zeros(data.num_concepts, data.dim, dtype=torch.float64)
    for split in ("train", "val", "test"):
        ids, dirs = data.load_split(split)
        teacher[ids] = dirs.double()
    assert results["analogies"]["teacher"] == analogy_scores(teacher, analogy_set_)
    assert results["analogies"]["counts"] == analogy_set_.counts()
    probe = results["linear_probe"]
    seeds = [probe["seeds"][s]["analogy_test_3cosadd"] for s in ("0", "1")]
    assert probe["analogy_test_3cosadd"] == pytest.approx(sum(seeds) / 2)
    # The exact probe reproduces the teacher's space, so its answers are the teacher's.
    assert probe["analogy_test_3cosadd"] == results["analogies"]["teacher"]["test_3cosadd"]
    table = paths["table"].read_text()
    assert "Test 3CosAdd" in table and "Teacher direction space (the reference)" in table
    metrics = [entry["metric"] for entry in results["summary"]]
    assert len(metrics) == 2 and "3CosAdd" in metrics[1]
