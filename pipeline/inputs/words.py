"""The concept list: words ranked by frequency, filtered, selected, and split.

Two sources: `wordfreq` (the ranked English list the package ships; offline) and
`nltk` (the NLTK `words` corpus, ranked by wordfreq's Zipf frequency, with POS
and category from WordNet; needs a download). The split of a concept depends
only on its text (or, with `split_by: stem`, its Snowball stem, so inflections
share a split) and `split_salt`, so growing `num_concepts` never moves an
existing concept between train, val and test.

    table, stats = build_concepts(params, nltk_dir=out / "nltk_data")
    pq.write_table(table, out / CONCEPTS_FILE)
    table = read_concepts(out / CONCEPTS_FILE)
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.splits import SPLITS, split_of
from pipeline.inputs.params import WordlistParams

log = logging.getLogger(__name__)

CONCEPTS_FILE = "concepts.parquet"
SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("pos", pa.string()),
        pa.field("category", pa.string()),
        pa.field("freq_rank", pa.int64(), nullable=False),
    ]
)
COLUMNS = tuple(SCHEMA.names)
DROP_REASONS = ("non_alpha", "too_short", "too_long", "duplicate")
NLTK_PACKAGES = ("words", "wordnet")
# WordNet synset POS tags; "s" (satellite adjective) is an adjective for our purposes.
_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
# Standard NLTK has no timeout of its own; a dead network must fail fast, not hang.
_NETWORK_TIMEOUT_S = 20.0

Ranked = list[tuple[str, int]]
Tag = tuple[str | None, str | None]


def filter_words(
    ranked: Iterable[tuple[str, int]], min_length: int, max_length: int
) -> tuple[Ranked, dict[str, int]]:
    """Lower-case, keep ASCII-alphabetic words of allowed length, dedupe keeping the best rank.

    Returns the survivors ordered by rank and the number dropped per reason.
    """
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept: Ranked = []
    seen: set[str] = set()
    for text, rank in sorted(ranked, key=lambda item: (item[1], item[0])):
        word = text.lower()
        reason = _drop_reason(word, min_length, max_length, seen)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(word)
        kept.append((word, rank))
    return kept, dropped


def _drop_reason(word: str, min_length: int, max_length: int, seen: set[str]) -> str | None:
    if not (word.isascii() and word.isalpha()):
        return "non_alpha"
    if len(word) < min_length:
        return "too_short"
    if len(word) > max_length:
        return "too_long"
    if word in seen:
        return "duplicate"
    return None


def select_top(kept: Ranked, params: WordlistParams, dropped: dict[str, int]) -> Ranked:
    """The `num_concepts` best-ranked survivors; a clear error when there are too few."""
    filters = (
        f"lower-case ASCII letters only, wordlist.min_length={params.min_length} <= length "
        f"<= wordlist.max_length={params.max_length}, deduplicated; dropped {dropped}"
    )
    if not kept:
        raise ValueError(
            f"the word list is empty after filtering: source {params.source!r}, {filters}"
        )
    if len(kept) < params.num_concepts:
        raise ValueError(
            f"wordlist.num_concepts={params.num_concepts} but source {params.source!r} has only "
            f"{len(kept)} words after filtering ({filters}); lower wordlist.num_concepts "
            "or widen the length range"
        )
    return kept[: params.num_concepts]


def wordfreq_ranked() -> Ranked:
    """wordfreq's English list, most frequent first (rank 0)."""
    import wordfreq

    return [(word, rank) for rank, word in enumerate(wordfreq.iter_wordlist("en"))]


def rank_by_frequency(words: Iterable[str]) -> Ranked:
    """Rank by wordfreq Zipf frequency, descending, ties by text; rank 0 is the most frequent."""
    import wordfreq

    scored = sorted((-wordfreq.zipf_frequency(word, "en"), word) for word in words)
    return [(word, rank) for rank, (_, word) in enumerate(scored)]


def wordnet_tags(texts: Iterable[str], wordnet: Any) -> list[Tag]:
    """(pos, lexname) of each word's first WordNet synset, or (None, None) without one."""
    tags: list[Tag] = []
    for text in texts:
        synsets = wordnet.synsets(text)
        if synsets:
            first = synsets[0]
            tags.append((_WORDNET_POS.get(first.pos(), first.pos()), first.lexname()))
        else:
            tags.append((None, None))
    return tags


def stems(texts: Iterable[str]) -> list[str]:
    """Each word's Snowball English stem (years, year -> year); nltk ships it, no download."""
    from nltk.stem import SnowballStemmer

    stemmer = SnowballStemmer("english")
    return [stemmer.stem(text) for text in texts]


def split_keys(texts: list[str], split_by: str) -> list[str]:
    """What each word's split hash is taken of: the text itself, or its Snowball English stem."""
    return list(texts) if split_by == "text" else stems(texts)


def stem_leak(texts: list[str], splits: list[str]) -> float:
    """Share of test words with another word of the same stem in train (0 when no test words)."""
    word_stems = stems(texts)
    train_stems = {stem for stem, split in zip(word_stems, splits, strict=True) if split == "train"}
    test = [stem for stem, split in zip(word_stems, splits, strict=True) if split == "test"]
    return sum(stem in train_stems for stem in test) / len(test) if test else 0.0


def concepts_table(chosen: Ranked, tags: list[Tag], params: WordlistParams) -> pa.Table:
    """The output table; ids follow selection (= frequency) order."""
    texts = [text for text, _ in chosen]
    columns = {
        "id": list(range(len(chosen))),
        "text": texts,
        "split": [
            split_of(key, params.splits, params.split_salt)
            for key in split_keys(texts, params.split_by)
        ],
        "source": [params.source] * len(chosen),
        "pos": [pos for pos, _ in tags],
        "category": [category for _, category in tags],
        "freq_rank": [rank for _, rank in chosen],
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def build_concepts(params: WordlistParams, nltk_dir: Path | None = None) -> tuple[pa.Table, dict]:
    """Build the concept table and its stats; `nltk_dir` receives the NLTK corpora (source nltk)."""
    if params.source == "wordfreq":
        return _build(params, wordfreq_ranked(), wordnet=None)
    if nltk_dir is None:
        raise ValueError("wordlist.source is 'nltk' but no folder for the NLTK corpora was given")
    with _nltk_root(nltk_dir):
        words, wordnet = load_nltk(nltk_dir)
        return _build(params, rank_by_frequency(words), wordnet)


def _build(params: WordlistParams, ranked: Ranked, wordnet: Any) -> tuple[pa.Table, dict]:
    kept, dropped = filter_words(ranked, params.min_length, params.max_length)
    chosen = select_top(kept, params, dropped)
    if wordnet is None:
        tags: list[Tag] = [(None, None)] * len(chosen)
    else:
        tags = wordnet_tags([text for text, _ in chosen], wordnet)
    table = concepts_table(chosen, tags, params)
    splits = table.column("split").to_pylist()
    stats = {
        "source": params.source,
        "split_by": params.split_by,
        "total": len(chosen),
        "splits": {name: splits.count(name) for name in SPLITS},
        "test_sharing_train_stem": stem_leak(table.column("text").to_pylist(), splits),
        "candidates": len(ranked),
        "available": len(kept),
        "dropped": dropped,
        "without_synset": sum(pos is None for pos, _ in tags) if wordnet is not None else None,
    }
    log.info("selected %d of %d filtered %s words", len(chosen), len(kept), params.source)
    return table, stats


def load_nltk(folder: Path) -> tuple[list[str], Any]:
    """The `words` list and a WordNet reader from `folder`, downloading what is missing."""
    from nltk.corpus.reader import WordListCorpusReader, WordNetCorpusReader

    download_nltk(folder)
    words = WordListCorpusReader(_find_nltk(folder, "words"), ["en"]).words()
    return list(words), WordNetCorpusReader(_find_nltk(folder, "wordnet"), None)


def download_nltk(folder: Path) -> None:
    """Download NLTK packages missing from `folder`; offline, a RuntimeError with the way out."""
    import nltk

    missing = [package for package in NLTK_PACKAGES if not _has_nltk(folder, package)]
    for package in missing:
        log.info("downloading NLTK %s into %s", package, folder)
        try:
            with _socket_timeout(_NETWORK_TIMEOUT_S):
                ok = nltk.download(
                    package, download_dir=str(folder), quiet=True, raise_on_error=True
                )
        except (OSError, ValueError) as err:
            raise RuntimeError(_offline_message(folder, package, err)) from err
        if not ok:
            raise RuntimeError(_offline_message(folder, package, "nltk.download returned False"))


def _offline_message(folder: Path, package: str, cause: object) -> str:
    return (
        f"NLTK corpora could not be downloaded into {folder} (likely offline; failed on "
        f"{package!r}: {cause}). Set `wordlist.source: wordfreq` in params.yaml (offline word "
        f"list), run `make demo` (offline tiny profile), or place the {', '.join(NLTK_PACKAGES)} "
        f"corpora under {folder}/corpora"
    )


@contextlib.contextmanager
def open_wordnet(folder: Path) -> Iterator[Any]:
    """A WordNet reader over the corpus already under `folder` (never downloads);
    FileNotFoundError naming the folder when it is not there."""
    from nltk.corpus.reader import WordNetCorpusReader

    folder = Path(folder)
    if not _has_nltk(folder, "wordnet"):
        raise FileNotFoundError(
            f"WordNet not found under {folder}/corpora: stage `wordlist` with "
            "`wordlist.source: nltk` downloads it there"
        )
    with _nltk_root(folder):
        yield WordNetCorpusReader(_find_nltk(folder, "wordnet"), None)


def _find_nltk(folder: Path, package: str) -> Any:
    import nltk

    return nltk.data.find(f"corpora/{package}", paths=[str(folder)])


def _has_nltk(folder: Path, package: str) -> bool:
    try:
        _find_nltk(folder, package)
    except LookupError:
        return False
    return True


@contextlib.contextmanager
def _nltk_root(folder: Path) -> Iterator[None]:
    """Trust `folder` while reading: hardened NLTK opens corpora only under nltk.data.path."""
    import nltk

    folder.mkdir(parents=True, exist_ok=True)
    entry = str(folder.resolve())
    nltk.data.path.insert(0, entry)
    try:
        yield
    finally:
        nltk.data.path.remove(entry)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def read_concepts(path: Path) -> pa.Table:
    """Read and check a concept table: the parquet file, or the folder holding CONCEPTS_FILE."""
    path = Path(path)
    if path.is_dir():
        path = path / CONCEPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"concept table not found: {path} (run the `wordlist` stage first)")
    table = pq.read_table(path)
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(
            f"{path} is not a concept table: missing columns {missing}; "
            f"expected {list(COLUMNS)}, found {table.column_names}"
        )
    table = table.select(list(COLUMNS))
    wrong = [
        f"{f.name}: {f.type} (expected {SCHEMA.field(f.name).type})"
        for f in table.schema
        if f.type != SCHEMA.field(f.name).type
    ]
    if wrong:
        raise ValueError(f"{path} has columns of the wrong type: {'; '.join(wrong)}")
    return table
