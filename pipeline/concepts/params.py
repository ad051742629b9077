"""Params of the concept-direction branch: sections `directions`, `distill`, `evaluate`,
`analogies`, `multilayer`, `inverse`, `cross_teacher`."""

from __future__ import annotations

import string
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from pipeline.common.params import (
    ComputeDType,
    DType,
    Sections,
    layer_list,
    positive,
    thread_count,
)

Approach = Literal["trainable", "frozen_mlp", "linear_probe", "char_cnn", "distilled"]
SLOT = "concept"
SPECIAL_TOKENS = 2
"""Tokens a tokenizer may add around a prompt: BOS (Llama), [CLS] + [SEP] (BERT), or
BOS + SentencePiece's dummy-prefix piece; byte-level BPE (Qwen, GPT-2) adds none."""


@dataclass(frozen=True)
class DirectionsParams:
    model: str = "Qwen/Qwen3-0.6B"
    """A Hugging Face hub id or a local model folder (tiny profile: data/teachers/tiny-qwen3)."""
    revision: str = "main"
    layers: tuple[int, ...] = (14,)
    """HF `hidden_states` indices: 0 is the embedding output, L the output of layer L."""
    templates: tuple[str, ...] = ("{concept}",)
    """Prompt templates with a `{concept}` slot; vectors are averaged over templates."""
    pooling: Literal["last", "mean"] = "last"
    """`last`: last non-padding token (decoders); `mean`: mean over tokens (encoders; on a
    decoder the start token is left out of the mean)."""
    start_token: str = "auto"
    """What opens every prompt (`pipeline/common/sequence_start.py`): `auto` puts the
    end-of-text token before a decoder's prompt when its tokenizer adds no BOS (Qwen3,
    SmolLM2), so the attention sink of position 0 is not the concept's last token; nothing
    for a tokenizer that adds its own ([CLS], <s>). `none`: nothing; or one token's text."""
    compute_dtype: ComputeDType = "bfloat16"
    storage_dtype: DType = "float32"
    shard_rows: int = 8192
    """Concepts per shard: few large files hash faster in DVC than many small ones."""
    max_length: int = 64
    # Knobs below do not change the result, so dvc.yaml does not list them as deps.
    batch_size: int = 64
    device: str = "auto"
    padding_side: Literal["left", "right"] = "right"
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    READS: ClassVar = ("wordlist",)

    def __post_init__(self) -> None:
        layer_list("directions.layers", self.layers)
        thread_count("directions.num_threads", self.num_threads)
        if not self.templates:
            raise ValueError("directions.templates is empty: give at least one template")
        for template in self.templates:
            template_parts(template)
        if not self.start_token:
            raise ValueError("directions.start_token is empty: give auto, none or a token")
        positive("directions.shard_rows", self.shard_rows)
        positive("directions.max_length", self.max_length)
        positive("directions.batch_size", self.batch_size)

    @property
    def deepest_layer(self) -> int:
        return max(self.layers)

    def check(self, params: Sections) -> None:
        """max_length must hold the longest prompt the word list can produce, counted in the
        worst case: one token per UTF-8 byte (byte-level BPE and SentencePiece's byte
        fallback never give more) plus SPECIAL_TOKENS. A shorter limit can truncate a
        prompt, and a truncated prompt silently pools a token that is not the concept's; a
        longer one costs nothing, since a batch is padded to its own longest prompt only."""
        longest_concept = params.wordlist.max_length
        # `auto` adds a start token only where the tokenizer adds none (sequence_start.py,
        # not imported here: it loads transformers), so it stays within SPECIAL_TOKENS.
        specials = SPECIAL_TOKENS + int(self.start_token not in ("auto", "none"))
        needs = {t: prompt_bytes(t, longest_concept) + specials for t in self.templates}
        template = max(needs, key=needs.__getitem__)
        if self.max_length < needs[template]:
            raise ValueError(
                f"directions.max_length={self.max_length} can truncate prompts: template "
                f"{template!r} with a concept of wordlist.max_length={longest_concept} "
                f"letters takes up to {needs[template]} tokens (one per byte, plus "
                f"{specials} special and start tokens); set directions.max_length >= "
                f"{needs[template]}"
            )


@dataclass(frozen=True)
class TrainParams:
    layer: int = 14
    """Which cached layer's directions to learn; must be one of directions.layers."""
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    seeds: tuple[int, ...] = (0,)
    """One training per seed (model init and shuffle order); evaluate reports each run's
    mean over seeds with a 95% t-interval (none with a single seed)."""
    buffer_rows: int = 65_536
    """Shuffle buffer: at most this many target rows are held in memory at once."""
    device: str = "cpu"
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    def __post_init__(self) -> None:
        thread_count("distill.train.num_threads", self.num_threads)
        positive("distill.train.epochs", self.epochs)
        positive("distill.train.batch_size", self.batch_size)
        positive("distill.train.buffer_rows", self.buffer_rows)
        if not self.seeds:
            raise ValueError("distill.train.seeds is empty: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"distill.train.seeds repeats a seed: {list(self.seeds)}")
        if self.lr <= 0:
            raise ValueError(f"distill.train.lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class RunParams:
    """One row of the seed-000 comparison table (and the issue-13 students)."""

    approach: Approach
    embed_dim: int | None = None
    """Width of the student's own table: token embedding (`trainable`), the rank of the
    distilled teacher table (`distilled`), byte embedding (`char_cnn`)."""
    hidden_dim: int | None = None
    """MLP hidden width (`trainable`, `frozen_mlp`, `distilled`, `char_cnn`)."""
    channels: int | None = None
    """Output channels of each of the two byte convolutions (`char_cnn` only)."""
    kernel_size: int | None = None
    """Bytes each convolution sees (`char_cnn` only)."""
    analogy_weight: float = 0.0
    """Weight of the auxiliary analogy-offset loss on train analogies
    (`pipeline.concepts.training.AnalogyOffsetLoss`); 0 trains exactly as without it."""

    NEEDS: ClassVar = {
        "trainable": ("embed_dim", "hidden_dim"),
        "frozen_mlp": ("hidden_dim",),
        "linear_probe": (),
        "distilled": ("embed_dim", "hidden_dim"),
        "char_cnn": ("embed_dim", "channels", "kernel_size", "hidden_dim"),
    }
    """The size params each approach needs; it takes no other."""

    def __post_init__(self) -> None:
        if self.approach not in self.NEEDS:
            raise ValueError(f"approach must be one of {list(self.NEEDS)}, got {self.approach!r}")
        if self.analogy_weight < 0:
            raise ValueError(f"analogy_weight must be >= 0, got {self.analogy_weight}")
        for name in ("embed_dim", "hidden_dim", "channels", "kernel_size"):
            value = getattr(self, name)
            if name in self.NEEDS[self.approach]:
                if value is None or value <= 0:
                    raise ValueError(
                        f"approach {self.approach} needs a positive {name}, got {value}"
                    )
            elif value is not None:
                raise ValueError(f"approach {self.approach} takes no {name} (got {value})")


@dataclass(frozen=True)
class DistillParams:
    READS: ClassVar = ("directions",)

    train: TrainParams = field(default_factory=TrainParams)
    runs: dict[str, RunParams] = field(default_factory=lambda: _seed_runs())
    analogy_runs: dict[str, RunParams] = field(default_factory=dict)
    """Runs with the auxiliary analogy loss (`analogy_weight` > 0). They are a stage of
    their own (`distill_analogy@<run>`), the only one that depends on the analogy set, so
    a change of the set re-runs them and no run of `runs`."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("distill.runs is empty: give at least one run")
        for name, run in self.runs.items():
            if run.analogy_weight > 0:
                raise ValueError(
                    f"distill.runs.{name}.analogy_weight={run.analogy_weight}: a run with the "
                    f"auxiliary analogy loss goes under distill.analogy_runs (its stage alone "
                    "depends on the analogy set)"
                )
        for name, run in self.analogy_runs.items():
            if run.analogy_weight <= 0:
                raise ValueError(
                    f"distill.analogy_runs.{name}.analogy_weight must be > 0, got "
                    f"{run.analogy_weight} (a run without the loss goes under distill.runs)"
                )
        shared = sorted(set(self.runs) & set(self.analogy_runs))
        if shared:
            raise ValueError(
                f"distill.runs and distill.analogy_runs both name {shared}: a run's name is "
                "its folder, so each must be unique"
            )

    @property
    def all_runs(self) -> dict[str, RunParams]:
        """Every trained row of the comparison table: `runs`, then `analogy_runs`."""
        return self.runs | self.analogy_runs

    def check(self, params: Sections) -> None:
        if self.train.layer not in params.directions.layers:
            raise ValueError(
                f"distill.train.layer={self.train.layer} is not cached: "
                f"directions.layers is {list(params.directions.layers)}"
            )


@dataclass(frozen=True)
class EvaluateParams:
    knn_k: int = 10
    """Neighbours averaged by the nearest-neighbour baseline."""
    retrieval_k: tuple[int, ...] = (1, 10)
    char_ngrams: tuple[int, ...] = (1, 4)
    """(min, max) n-gram length of the bag-of-characters baseline (the char student's
    linear control): counts of character n-grams -> direction by ridge regression."""
    ridge_alphas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    """Ridge penalties the bag-of-characters baseline tries; the best on val is kept."""
    min_rows: int = 30
    """The fewest concepts (or analogies) a table's metric may rest on: below it the cell
    reads `n=10 < 30` instead of a number (the JSON keeps the value), here and in the
    summary."""
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    def __post_init__(self) -> None:
        thread_count("evaluate.num_threads", self.num_threads)
        positive("evaluate.knn_k", self.knn_k)
        positive("evaluate.min_rows", self.min_rows)
        for k in self.retrieval_k:
            positive("evaluate.retrieval_k", k)
        if len(self.char_ngrams) != 2 or not 1 <= self.char_ngrams[0] <= self.char_ngrams[1]:
            raise ValueError(
                f"evaluate.char_ngrams must be [min, max] with 1 <= min <= max, "
                f"got {list(self.char_ngrams)}"
            )
        if not self.ridge_alphas:
            raise ValueError("evaluate.ridge_alphas is empty: give at least one alpha")
        for alpha in self.ridge_alphas:
            if alpha <= 0:
                raise ValueError(f"evaluate.ridge_alphas must be > 0, got {alpha}")


Suffix = Literal["s", "ed", "ing", "er", "est", "ly"]
WordnetRelation = Literal["antonym", "derivation"]


@dataclass(frozen=True)
class AnalogiesParams:
    """Section `analogies`: the analogy set a:b::c:d built from the word list."""

    suffixes: tuple[Suffix, ...] = ("s", "ed", "ing", "er", "est", "ly")
    """Suffix rules, one relation each (`+ed`: walk:walked), with the usual spelling
    rules (e-drop, consonant doubling, y -> i); `er`/`est` are the comparative and
    superlative of adjectives: a base counts only with both forms in the word list."""
    wordnet: tuple[WordnetRelation, ...] = ("antonym", "derivation")
    """WordNet relations (`antonym`; `derivation`: verb -> derivationally related noun),
    used when the word list comes from NLTK (`wordlist.source: nltk`), skipped with a
    message for wordfreq."""
    min_base_length: int = 3
    """Shortest base word a suffix rule starts from (so "bed" is never "b" + "ed")."""
    max_per_relation: int = 2000
    """Cap on analogies per relation: a seeded sample of the ordered pairs of pairs."""
    seed: int = 0

    def __post_init__(self) -> None:
        positive("analogies.min_base_length", self.min_base_length)
        positive("analogies.max_per_relation", self.max_per_relation)
        for key in ("suffixes", "wordnet"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"analogies.{key} repeats an entry: {list(values)}")
        if not self.suffixes and not self.wordnet:
            raise ValueError("analogies.suffixes and analogies.wordnet are both empty")


@dataclass(frozen=True)
class MultilayerParams:
    """Stage `multilayer`: one student with a shared trunk and one head per layer, against
    one single-layer student per layer at equal parameters; both trained as `distill.train`
    says (epochs, batch size, lr, weight decay, seeds, buffer)."""

    hidden_dim: int = 256
    """Width h of the shared trunk (frozen teacher rows -> mean -> Linear(E, h) -> GELU);
    each layer's head is Linear(h, D). The single-layer students' width is derived."""
    layers: tuple[int, ...] | None = None
    """The layers the heads predict, at least two, each among directions.layers; null:
    every cached layer."""
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    READS: ClassVar = ("directions",)

    def __post_init__(self) -> None:
        thread_count("multilayer.num_threads", self.num_threads)
        positive("multilayer.hidden_dim", self.hidden_dim)
        if self.layers is not None:
            layer_list("multilayer.layers", self.layers)

    def heads(self, directions: DirectionsParams) -> tuple[int, ...]:
        """The layers the student predicts, in head order."""
        return self.layers if self.layers is not None else directions.layers

    def check(self, params: Sections) -> None:
        """Explicit layers must be cached. Fewer than two heads is the stage's error, not
        the file's: a one-layer directions dump is valid for every other stage."""
        cached = list(params.directions.layers)
        unknown = [layer for layer in self.heads(params.directions) if layer not in cached]
        if unknown:
            raise ValueError(
                f"multilayer.layers={list(self.layers)} holds {unknown}, not cached: "
                f"directions.layers is {cached}"
            )


@dataclass(frozen=True)
class InverseParams:
    """Stage `inverse`: least squares direction -> the concept's input embedding (seed 000's
    negative result), next to the forward fit and a train-mean control."""

    layer: int | None = None
    """The cached layer whose directions are inverted, one of directions.layers; null:
    distill.train.layer."""
    ridge: float = 0.0
    """L2 penalty of both least-squares fits (0: plain least squares); never on the
    intercept."""
    bootstrap_samples: int = 2000
    """Resamples of the test concepts for every 95% interval."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    num_threads: int | None = None
    """torch's CPU threads (`pipeline.common.devices.set_threads`); null: torch's default.
    Not a DVC dep."""

    READS: ClassVar = ("directions", "distill")

    def __post_init__(self) -> None:
        thread_count("inverse.num_threads", self.num_threads)
        if self.ridge < 0:
            raise ValueError(f"inverse.ridge must be >= 0, got {self.ridge}")
        positive("inverse.bootstrap_samples", self.bootstrap_samples)

    def inverted_layer(self, distill: DistillParams) -> int:
        return self.layer if self.layer is not None else distill.train.layer

    def check(self, params: Sections) -> None:
        if self.layer is not None and self.layer not in params.directions.layers:
            raise ValueError(
                f"inverse.layer={self.layer} is not cached: "
                f"directions.layers is {list(params.directions.layers)}"
            )


@dataclass(frozen=True)
class CrossTeacherParams:
    """Stage `cross_teacher`: a second concept teacher for the same concepts and splits. Its
    directions are extracted by the `directions` code (the other keys of `directions`:
    storage dtype, max_length, shard rows, padding side, as there), the `runs` are trained on
    them as `distill.train` says (seeds, epochs, best epoch on val) and scored as `evaluate`
    scores (same baselines); the table puts each teacher's best of those runs next to its
    best baseline."""

    model: str | None = None
    """A hub id or local model folder; null: no second teacher (the stage writes a record
    saying it was skipped, and trains nothing)."""
    revision: str = "main"
    layer: int = 6
    """The HF `hidden_states` index its directions are read at, and its students learn."""
    pooling: Literal["last", "mean"] = "mean"
    """As `directions.pooling`: `last` for a decoder, `mean` for an encoder."""
    templates: tuple[str, ...] | None = None
    """Prompt templates with a `{concept}` slot; null: `directions.templates`."""
    start_token: str = "auto"
    """As `directions.start_token` (`auto`: the end-of-text token before a decoder's prompt
    when its tokenizer adds no BOS)."""
    compute_dtype: ComputeDType = "float32"
    runs: tuple[str, ...] = ("frozen_h256", "linear_probe")
    """Keys of `distill.runs` trained on the second teacher; the table compares each
    teacher's best of these on val (the main teacher's from `evaluate`)."""
    # Knobs below do not change the result, so dvc.yaml does not list them as deps.
    batch_size: int = 64
    device: str = "auto"
    num_threads: int | None = None
    """torch's CPU threads for the extraction and the training
    (`pipeline.common.devices.set_threads`); null: torch's default. Not a DVC dep."""

    READS: ClassVar = ("directions", "distill")

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"cross_teacher.layer must be >= 0, got {self.layer}")
        if not self.runs:
            raise ValueError("cross_teacher.runs is empty: name at least one key of distill.runs")
        if len(set(self.runs)) != len(self.runs):
            raise ValueError(f"cross_teacher.runs repeats a run: {list(self.runs)}")
        if self.templates is not None:
            if not self.templates:
                raise ValueError("cross_teacher.templates is empty: give a template, or null")
            for template in self.templates:
                template_parts(template, "cross_teacher.templates")
        if not self.start_token:
            raise ValueError("cross_teacher.start_token is empty: give auto, none or a token")
        positive("cross_teacher.batch_size", self.batch_size)
        thread_count("cross_teacher.num_threads", self.num_threads)

    def directions_params(self, directions: DirectionsParams) -> DirectionsParams:
        """The `directions` params that extract this teacher: its own model, layer, pooling,
        templates and start token; the rest as the main teacher's."""
        return replace(
            directions,
            model=self.model,
            revision=self.revision,
            layers=(self.layer,),
            templates=directions.templates if self.templates is None else self.templates,
            pooling=self.pooling,
            start_token=self.start_token,
            compute_dtype=self.compute_dtype,
            batch_size=self.batch_size,
            device=self.device,
            num_threads=self.num_threads,
        )

    def check(self, params: Sections) -> None:
        """Each run is a plain run of `distill.runs` (an analogy run needs the analogy set);
        `directions.max_length` holds this teacher's templates too."""
        if self.model is None:
            return
        unknown = [run for run in self.runs if run not in params.distill.runs]
        if unknown:
            raise ValueError(
                f"cross_teacher.runs holds {unknown}, not keys of distill.runs "
                f"({sorted(params.distill.runs)})"
            )
        self.directions_params(params.directions).check(params)


def template_parts(template: str, key: str = "directions.templates") -> tuple[str, int]:
    """(literal text, number of {concept} slots) of a prompt template, checked: well-formed
    braces (`{{` and `}}` are literal ones), only the plain `{concept}` placeholder, at least
    one of it. `key` is the params key the template came from, named in errors."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"{key} entry {template!r} is malformed: {err} (write {{{{ or }}}} for a literal brace)"
        ) from None
    literal, slots = "", 0
    for text, name, spec, conversion in parsed:
        literal += text
        if name is None:
            continue
        if name != SLOT or spec or conversion:
            written = "{" + name + (f"!{conversion}" if conversion else "")
            written += (f":{spec}" if spec else "") + "}"
            raise ValueError(
                f"{key} entry {template!r} has the placeholder {written}: only {{{SLOT}}} is "
                "filled in (write {{ or }} for a literal brace)"
            )
        slots += 1
    if not slots:
        raise ValueError(f"{key} entry {template!r} lacks a {{{SLOT}}} slot")
    return literal, slots


def prompt_bytes(template: str, concept_length: int) -> int:
    """UTF-8 bytes of `template` filled with an ASCII concept of `concept_length` letters."""
    literal, slots = template_parts(template)
    return len(literal.encode()) + slots * concept_length


def _seed_runs() -> dict[str, RunParams]:
    return {
        "frozen_h256": RunParams("frozen_mlp", hidden_dim=256),
        "linear_probe": RunParams("linear_probe"),
        "trainable_e32_h128": RunParams("trainable", embed_dim=32, hidden_dim=128),
    }
