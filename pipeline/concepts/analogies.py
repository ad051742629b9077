"""Stage `analogies`: reads data/wordlist (concepts.parquet; WordNet from its nltk_data for an NLTK word list); writes data/analogies/analogies.parquet and stats.json.

Command: python -m pipeline.cli analogies --params params.yaml --wordlist data/wordlist --out data/analogies

An analogy a:b::c:d joins two pairs of concepts that share a relation, both words of
each pair in the word list:

- suffix rules (`analogies.suffixes`), one relation each: `+s` (year:years, box:boxes,
  city:cities), `+ed` (walk:walked, bake:baked, stop:stopped, try:tried), `+ing`
  (make:making, run:running, die:dying), `+er` / `+est` (big:bigger, nice:nicest,
  happy:happier), `+ly` (quick:quickly, happy:happily, simple:simply). The spelling
  rules: e-drop, consonant doubling after a consonant-vowel-consonant ending (the only
  form for a one-vowel word: hop -> hopped, never hoped), y -> i after a consonant.
  Against spurious pairs: the base has at least `analogies.min_base_length` letters
  ("bed" is not "b" + "ed"); for `+s`, `+ed`, `+ing` both words share their Snowball
  stem (news is not new + s); `+er` / `+est` count only for a base with both forms in
  the list (adjectives: numb/number has no "numbest").
- WordNet relations (`analogies.wordnet`) when the word list comes from NLTK: `antonym`
  (each unordered pair once, the more frequent word first) and `derivation` (a verb
  lemma to a derivationally related noun lemma: decide:decision). With a wordfreq word
  list there is no WordNet: they are skipped with a message (stats `skipped`).

Per relation, the analogies are the ordered pairs of distinct pairs sharing no word,
capped at `analogies.max_per_relation` by a seeded sample (`analogies.seed`), written in
a fixed order. Each gets a split "with the concepts" (`analogy_split`): train only if
all four words are train concepts, test if any is a test concept, else val. stats.json
holds, per relation, the pairs found and the analogies per split.
"""  # noqa: E501

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from pipeline.common.io import atomic_path, write_json
from pipeline.common.params import load_params
from pipeline.concepts.analogy_set import ANALOGIES_FILE, SCHEMA, STATS_FILE, analogy_split
from pipeline.concepts.params import AnalogiesParams
from pipeline.inputs.words import CONCEPTS_FILE, open_wordnet, read_concepts, stems

log = logging.getLogger(__name__)

PARAMS = Path("params.yaml")
NLTK_DIR = "nltk_data"
VOWELS = frozenset("aeiou")
STEM_CHECKED = ("s", "ed", "ing")
"""Inflections whose two words must share a Snowball stem."""
PAIRED = {"er": "est", "est": "er"}
"""A comparative counts only where the superlative is in the list too, and vice versa."""

Pair = tuple[str, str]


def _consonant(letter: str) -> bool:
    return letter not in VOWELS


def _cvc(word: str) -> bool:
    """Ends consonant-vowel-consonant (not w, x, y): where English doubles the consonant."""
    return (
        len(word) >= 3
        and _consonant(word[-1])
        and word[-1] not in "wxy"
        and not _consonant(word[-2])
        and _consonant(word[-3])
    )


def _vowel_groups(word: str) -> int:
    groups, previous = 0, False
    for letter in word:
        vowel = letter in VOWELS
        groups += vowel and not previous
        previous = vowel
    return groups


def derived_forms(base: str, suffix: str) -> list[str]:
    """The spellings `base` + `suffix` can take, most regular first."""
    if suffix == "s":
        if base.endswith(("s", "x", "z", "ch", "sh")):
            return [base + "es"]
        if base.endswith("y") and _consonant(base[-2]):
            return [base[:-1] + "ies"]
        return [base + "s"]
    if suffix == "ly":
        if base.endswith("y") and _consonant(base[-2]):
            return [base[:-1] + "ily"]
        if base.endswith("le") and _consonant(base[-3]):
            return [base[:-1] + "y"]
        if base.endswith("ic"):
            return [base + "ally"]
        return [base + "ly"]
    # Vowel-initial suffixes: ed, ing, er, est.
    if suffix == "ing" and base.endswith("ie"):
        return [base[:-2] + "ying"]
    if base.endswith("e"):
        if suffix == "ing":
            return [base + "ing"] if base.endswith(("ee", "ye", "oe")) else [base[:-1] + "ing"]
        return [base + suffix[1:]]
    if suffix != "ing" and base.endswith("y") and _consonant(base[-2]):
        return [base[:-1] + "i" + suffix]
    doubled = base + base[-1] + suffix
    if _cvc(base):
        # One vowel: always doubled (stop -> stopped); longer words depend on stress.
        return [doubled] if _vowel_groups(base) == 1 else [base + suffix, doubled]
    return [base + suffix]


def suffix_pairs(words: Sequence[str], suffix: str, min_base_length: int) -> list[Pair]:
    """(base, derived) pairs of `words` related by `suffix`, in the order of `words`."""
    present = set(words)
    pairs = []
    for base in words:
        if len(base) < min_base_length:
            continue
        derived = next((w for w in derived_forms(base, suffix) if w in present), None)
        if derived is None or derived == base:
            continue
        partner = PAIRED.get(suffix)
        if partner and not any(w in present for w in derived_forms(base, partner)):
            continue
        pairs.append((base, derived))
    if suffix in STEM_CHECKED and pairs:
        bases, derived = stems([p[0] for p in pairs]), stems([p[1] for p in pairs])
        pairs = [p for p, x, y in zip(pairs, bases, derived, strict=True) if x == y]
    return pairs


def wordnet_pairs(words: Sequence[str], relation: str, wordnet: Any) -> list[Pair]:
    """Pairs of `words` related in WordNet: `antonym` (unordered, the earlier word of
    `words` first) or `derivation` (verb lemma -> derivationally related noun lemma)."""
    rank = {w: i for i, w in enumerate(words)}
    pairs: dict[Pair, None] = {}
    for word in words:
        for lemma in wordnet.lemmas(word):
            if lemma.name() != word:
                continue
            if relation == "antonym":
                related = [other for other in lemma.antonyms()]
            elif relation == "derivation":
                if lemma.synset().pos() != "v":
                    continue
                related = [
                    other
                    for other in lemma.derivationally_related_forms()
                    if other.synset().pos() == "n"
                ]
            else:
                raise ValueError(f"unknown WordNet relation {relation!r}")
            for other in related:
                name = other.name()
                if name not in rank or name == word:
                    continue
                pair = (word, name)
                if relation == "antonym" and rank[name] < rank[word]:
                    pair = (name, word)
                pairs[pair] = None
    return list(pairs)


def _relation_seed(seed: int, relation: str) -> list[int]:
    """A stable seed per relation, so adding a relation never moves another's sample."""
    digest = hashlib.sha256(relation.encode()).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def sample_analogies(num_pairs: int, cap: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to `cap` ordered pairs (i, j), i != j, of pair indices, sorted; all when fewer."""
    total = num_pairs * (num_pairs - 1)
    if total == 0:
        return []
    chosen = np.sort(rng.choice(total, size=min(cap, total), replace=False))
    first, rest = np.divmod(chosen, num_pairs - 1)
    second = rest + (rest >= first)  # skip the diagonal
    return list(zip(first.tolist(), second.tolist(), strict=True))


def analogies_from_pairs(
    pairs: Sequence[Pair], cap: int, seed: int, relation: str
) -> list[tuple[Pair, Pair]]:
    """The capped, seeded sample of a:b::c:d from `pairs`; pairs sharing a word are dropped
    after sampling (an antonym pair and its reverse would make d = a)."""
    rng = np.random.default_rng(_relation_seed(seed, relation))
    out = []
    for i, j in sample_analogies(len(pairs), cap, rng):
        first, second = pairs[i], pairs[j]
        if set(first) & set(second):
            continue
        out.append((first, second))
    return out


def relation_pairs(
    words: Sequence[str], params: AnalogiesParams, wordnet: Any
) -> tuple[dict[str, list[Pair]], list[str]]:
    """relation name -> its pairs, in params order; and the relations skipped (no WordNet)."""
    relations = {
        f"+{suffix}": suffix_pairs(words, suffix, params.min_base_length)
        for suffix in params.suffixes
    }
    skipped = []
    for relation in params.wordnet:
        if wordnet is None:
            skipped.append(relation)
        else:
            relations[relation] = wordnet_pairs(words, relation, wordnet)
    return relations, skipped


def build_analogies(
    concepts: pa.Table, params: AnalogiesParams, wordnet: Any = None
) -> tuple[pa.Table, dict[str, Any]]:
    """The analogy table (SCHEMA) and its stats from the concept table."""
    texts = concepts.column("text").to_pylist()
    ids = dict(zip(texts, concepts.column("id").to_pylist(), strict=True))
    split_of = dict(zip(texts, concepts.column("split").to_pylist(), strict=True))
    relations, skipped = relation_pairs(texts, params, wordnet)
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    stats: dict[str, Any] = {"relations": {}, "skipped": skipped}
    for relation, pairs in relations.items():
        counts = dict.fromkeys(("train", "val", "test"), 0)
        for (a, b), (c, d) in analogies_from_pairs(
            pairs, params.max_per_relation, params.seed, relation
        ):
            split = analogy_split([split_of[w] for w in (a, b, c, d)])
            counts[split] += 1
            for key, word in zip("abcd", (a, b, c, d), strict=True):
                columns[key].append(word)
                columns[f"{key}_id"].append(ids[word])
            columns["relation"].append(relation)
            columns["split"].append(split)
        stats["relations"][relation] = {"pairs": len(pairs), "analogies": counts}
        stats["relations"][relation]["examples"] = [f"{a}:{b}" for a, b in pairs[:5]]
    stats["total"] = len(columns["split"])
    return pa.Table.from_pydict(columns, schema=SCHEMA), stats


def _word_source(concepts: pa.Table) -> str:
    sources = set(concepts.column("source").to_pylist())
    return sources.pop() if len(sources) == 1 else ",".join(sorted(sources))


def run(params: AnalogiesParams, wordlist: Path, out: Path) -> dict[str, Any]:
    """Build the analogy set from `wordlist`/concepts.parquet into `out`; returns the stats."""
    path = Path(wordlist) / CONCEPTS_FILE
    concepts = read_concepts(path)
    source = _word_source(concepts)
    if params.wordnet and source == "nltk":
        with open_wordnet(Path(wordlist) / NLTK_DIR) as wordnet:
            table, stats = build_analogies(concepts, params, wordnet)
    else:
        table, stats = build_analogies(concepts, params)
    if stats["skipped"]:
        log.warning(
            "analogies: WordNet relations %s skipped: the word list comes from %s, not "
            "NLTK (wordlist.source: nltk brings WordNet)",
            stats["skipped"],
            source,
        )
    if stats["total"] == 0:
        raise ValueError(
            f"no analogies found in {path}: no relation of analogies.suffixes / "
            "analogies.wordnet has two pairs; use more concepts (wordlist.num_concepts)"
        )
    out = Path(out)
    with atomic_path(out / ANALOGIES_FILE) as tmp:
        pq.write_table(table, tmp)
    write_json(out / STATS_FILE, stats | {"word_source": source}, sort_keys=False)
    return stats


def _describe(stats: dict[str, Any]) -> Iterable[str]:
    for relation, entry in stats["relations"].items():
        split_counts = "/".join(str(n) for n in entry["analogies"].values())
        yield f"{relation} {entry['pairs']} pairs, {split_counts}"


def command(
    wordlist: Annotated[Path, typer.Option(help="Folder written by the wordlist stage.")],
    out: Annotated[Path, typer.Option(help="Folder for analogies.parquet and stats.json.")],
    params: Annotated[Path, typer.Option(help="Params file; its `analogies` section.")] = PARAMS,
) -> None:
    """Build the analogy set a:b::c:d from the word list (suffix rules, WordNet)."""
    cfg = load_params(params, analogies=AnalogiesParams).analogies
    stats = run(cfg, wordlist, out)
    typer.echo(
        f"analogies: {stats['total']} (train/val/test per relation: "
        f"{'; '.join(_describe(stats))}) -> {out}"
    )
