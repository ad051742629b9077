"""The directions stage: known answers against transformers, resumption, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common.scratch import SCRATCH
from pipeline.common.shards import Manifest, layer_key, read_shard
from pipeline.common.teacher import TeacherLoadError, load_teacher
from pipeline.concepts import directions
from pipeline.concepts.concept_vectors import pool
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import DirectionsParams
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.tiny_models import build_tiny, save_tiny
from pipeline.inputs.words import SCHEMA, concepts_table

ROOT = Path(__file__).resolve().parents[2]
# Mixed lengths: one-token words next to words the tiny BPE splits into several.
WORDS = ["time", "the", "thunderstorm", "cat", "photosynthesis", "run", "blue", "extraordinary"]
TEMPLATES = ("{concept}", 'The word "{concept}" means')


def write_wordlist(path: Path, words: list[str]) -> Path:
    if words:
        ranked = [(w, i) for i, w in enumerate(words)]
        params = WordlistParams(source="wordfreq", num_concepts=len(words))
        table = concepts_table(ranked, [(None, None)] * len(words), params)
    else:
        table = SCHEMA.empty_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def tiny_params(**overrides) -> DirectionsParams:
    base = dict(
        model="tiny:qwen3",
        layers=(2, 4),
        templates=TEMPLATES,
        compute_dtype="float32",
        shard_rows=3,
        batch_size=4,
    )
    return DirectionsParams(**(base | overrides))


def stored_activations(folder: Path, layer: int) -> torch.Tensor:
    manifest = Manifest.load(folder)
    rows = [read_shard(folder, r)[layer_key(layer)] for r in manifest.shards]
    return torch.cat(rows)


@pytest.fixture(scope="module")
def tiny_model():
    model, tokenizer = build_tiny("tiny:qwen3")
    return model, tokenizer


def reference_vector(model, tokenizer, word: str, layer: int) -> torch.Tensor:
    """hidden_states[layer] at the last token of each unpadded prompt, averaged."""
    vectors = []
    for template in TEMPLATES:
        ids = tokenizer(template.format(concept=word), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[layer]
        vectors.append(hidden[0, -1])
    return torch.stack(vectors).mean(0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_vectors_equal_transformers_hidden_states(tmp_path, tiny_model, padding_side):
    wordlist = write_wordlist(tmp_path / "wordlist" / "concepts.parquet", WORDS)
    directions.run(tiny_params(padding_side=padding_side), wordlist, tmp_path / "out")
    model, tokenizer = tiny_model
    lengths = {len(tokenizer(w)["input_ids"]) for w in WORDS}
    assert len(lengths) > 1, "the batch must mix prompt lengths"
    for layer in (2, 4):  # 4 is the last layer: HF reports it after the final norm
        stored = stored_activations(tmp_path / "out", layer)
        expected = torch.stack([reference_vector(model, tokenizer, w, layer) for w in WORDS])
        rel = (stored - expected).norm(dim=1) / expected.norm(dim=1)
        assert rel.max() <= 1e-5, f"layer {layer}: max relative error {rel.max():.2e}"


def test_side_files_hold_token_ids_embeddings_and_train_mean(tmp_path, tiny_model):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    directions.run(tiny_params(), wordlist, tmp_path / "out")
    model, tokenizer = tiny_model
    data = DirectionSet(tmp_path / "out", layer=2)
    tokens, mask = data.concept_tokens(torch.tensor([2]))
    assert (
        tokens[0][mask[0]].tolist()
        == tokenizer("thunderstorm", add_special_tokens=False)["input_ids"]
    )
    table = model.get_input_embeddings().weight
    assert torch.equal(data.embedding_rows, table[data.embedding_token_ids].detach())
    splits = pq.read_table(wordlist).column("split").to_pylist()
    train = torch.tensor([s == "train" for s in splits])
    assert torch.allclose(
        data.mean, stored_activations(tmp_path / "out", 2)[train].mean(0), atol=1e-6
    )


def test_pooling_last_and_mean_on_a_hand_built_batch():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # (B, T, D)
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, left, "last").flatten().tolist() == [2.0, 5.0]
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 5.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 4.0]


def test_local_path_gives_the_same_vectors_as_the_builtin(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS[:4])
    local = save_tiny("tiny:qwen3", tmp_path / "tiny-qwen3")
    directions.run(tiny_params(), wordlist, tmp_path / "a")
    directions.run(tiny_params(model=str(local)), wordlist, tmp_path / "b")
    assert torch.allclose(
        stored_activations(tmp_path / "a", 2), stored_activations(tmp_path / "b", 2)
    )


def test_layer_beyond_depth_is_refused_before_writing(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    with pytest.raises(ValueError, match=r"directions.layers holds \[9\].*4 layers"):
        directions.run(tiny_params(layers=(2, 9)), wordlist, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreachable_model_names_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        TeacherLoadError, match="(?s)no-such-org/no-such-model.*local copy.*make demo"
    ):
        load_teacher("no-such-org/no-such-model", "main", (1,))


def test_tampered_shard_is_refused(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    directions.run(tiny_params(), wordlist, tmp_path / "out")
    shard = tmp_path / "out" / "shard-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    data = DirectionSet(tmp_path / "out", layer=2)
    with pytest.raises(ValueError, match="shard-00001.safetensors is corrupt"):
        data.load_split("train")


def test_empty_wordlist_is_refused(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", [])
    with pytest.raises(ValueError, match="holds no concepts"):
        directions.run(tiny_params(), wordlist, tmp_path / "out")


def test_result_neutral_knobs_keep_the_fingerprint_and_others_change_it(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    base = directions._fingerprint_inputs(tiny_params(), wordlist)
    assert directions._fingerprint_inputs(tiny_params(batch_size=1, device="cpu"), wordlist) == base
    assert directions._fingerprint_inputs(tiny_params(templates=("{concept}",)), wordlist) != base
    assert directions._fingerprint_inputs(tiny_params(layers=(1,)), wordlist) != base


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    words = [f"{a}{b}" for a in ("sun", "moon", "star", "sky") for b in WORDS] * 20  # 640 concepts
    wordlist = write_wordlist(tmp_path / "concepts.parquet", words)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        "wordlist: {source: wordfreq}\n"
        "directions: {model: 'tiny:qwen3', layers: [2], compute_dtype: float32, shard_rows: 16,"
        " batch_size: 4, templates: ['{concept}', 'The word {concept}', 'A {concept}']}\n"
        "distill: {train: {layer: 2}, runs: {lp: {approach: linear_probe}}}\n"
    )
    out = tmp_path / "killed" / "directions"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "directions",
        "--params",
        str(params_file),
        "--wordlist",
        str(wordlist),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch = out.parent / SCRATCH
    deadline = time.time() + 120
    while time.time() < deadline and not list(scratch.glob("*/shard-00001.safetensors.json")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(scratch.glob("*/shard-*.json")))
    assert not out.exists() and 0 < finished < 40, f"kill landed after {finished} of 40 shards"

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    reused = int(rerun.stdout.split("'reused_shards': ")[1].split(",")[0])
    assert reused >= finished - 1 and reused > 0
    assert not scratch.exists()

    reference = tmp_path / "clean" / "directions"
    subprocess.run([*cmd[:-1], str(reference)], cwd=ROOT, check=True, capture_output=True)
    killed, clean = Manifest.load(out), Manifest.load(reference)
    assert [s.sha256 for s in killed.shards] == [s.sha256 for s in clean.shards]
    assert json.dumps({k: v.sha256 for k, v in killed.files.items()}) == json.dumps(
        {k: v.sha256 for k, v in clean.files.items()}
    )


def test_teacher_stops_at_the_deepest_layer_without_lm_head():
    teacher = load_teacher("tiny:qwen3", None, (1, 2))
    assert len(teacher.model.layers) == 2 and teacher.num_layers == 4
    assert not any("lm_head" in name for name, _ in teacher.model.named_modules())
    assert isinstance(teacher.model.norm, torch.nn.Identity)  # hidden_states[2] is pre-norm


def test_encoder_model_by_local_path_with_mean_pooling(tmp_path, tiny_model):
    from transformers import BertConfig, BertModel

    _, tokenizer = tiny_model
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    bert = BertModel(config).eval()
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    params = tiny_params(model=str(tmp_path / "bert"), layers=(2,), pooling="mean")
    directions.run(params, wordlist, tmp_path / "out")
    expected = []
    for word in WORDS:
        vectors = []
        for template in TEMPLATES:
            ids = tokenizer(template.format(concept=word), return_tensors="pt")["input_ids"]
            with torch.no_grad():
                vectors.append(bert(ids, output_hidden_states=True).hidden_states[2][0].mean(0))
        expected.append(torch.stack(vectors).mean(0))
    stored = stored_activations(tmp_path / "out", 2)
    rel = (stored - torch.stack(expected)).norm(dim=1) / torch.stack(expected).norm(dim=1)
    assert rel.max() <= 1e-5


@pytest.mark.slow
def test_torchrun_world_size_two_writes_the_same_shards_as_one_process(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        "wordlist: {source: wordfreq}\n"
        "directions: {model: 'tiny:qwen3', layers: [2], compute_dtype: float32, shard_rows: 3}\n"
        "distill: {train: {layer: 2}, runs: {lp: {approach: linear_probe}}}\n"
    )
    args = [
        "-m",
        "pipeline.cli",
        "directions",
        "--params",
        str(params_file),
        "--wordlist",
        str(wordlist),
        "--out",
    ]
    subprocess.run(
        [sys.executable, *args, str(tmp_path / "one")], cwd=ROOT, check=True, capture_output=True
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    done = subprocess.run(
        [*torchrun, *args, str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'world_size': 2" in done.stdout and "'rank': 1" in done.stdout
    one, two = Manifest.load(tmp_path / "one"), Manifest.load(tmp_path / "two")
    assert len(one.shards) == 3
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    assert {k: v.sha256 for k, v in one.files.items()} == {
        k: v.sha256 for k, v in two.files.items()
    }


def test_shared_prefix_leaves_every_prompt_a_token(tiny_model):
    from pipeline.concepts.concept_vectors import shared_prefix

    assert shared_prefix([[1, 2, 3], [1, 2, 4, 5], [1, 2, 3, 9]]) == [1, 2]
    assert shared_prefix([[1, 2], [1, 2, 3]]) == [1]
    assert shared_prefix([[7], [1, 2]]) == []
    _, tokenizer = tiny_model
    encoded = tokenizer([TEMPLATES[1].format(concept=w) for w in WORDS])["input_ids"]
    assert len(shared_prefix(encoded)) >= 2, "the known-answer test must exercise the cache path"
