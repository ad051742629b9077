"""Teacher helpers: the decoder blocks of any HF family, and the params key a bad layer names."""

from __future__ import annotations

import io
import logging
import shutil
import time
import warnings
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
)

from pipeline.common.identity import looks_like_path
from pipeline.common.teacher import (
    TeacherLoadError,
    cut_teacher,
    decoder_blocks,
    load_causal_lm,
    load_teacher,
    pretrained,
)
from pipeline.steering_vectors.vector import McBatch, ending_scores


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config)


def test_decoder_blocks_of_a_causal_lm_are_its_base_models():
    model = tiny_llama(3)
    blocks = decoder_blocks(model)
    assert blocks is model.model.layers and len(blocks) == 3
    assert decoder_blocks(model.model) is blocks


def test_decoder_blocks_across_families():
    gpt2 = GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16))
    assert decoder_blocks(gpt2) is gpt2.h
    bert = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    assert decoder_blocks(bert) is bert.encoder.layer and len(bert.encoder.layer) == 4
    with pytest.raises(ValueError, match="cannot find the transformer blocks of Sequential"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_a_layer_beyond_the_depth_names_the_callers_params_key():
    model = tiny_llama(3)
    with pytest.raises(ValueError, match=r"^activations.layers holds \[5\] but tiny has 3 layers"):
        cut_teacher(model.model, None, (2, 5), model_id="tiny", layers_key="activations.layers")
    assert len(decoder_blocks(model)) == 3  # refused before anything was cut


def test_cut_teacher_truncates_the_blocks_decoder_blocks_finds():
    tokenizer = SimpleNamespace(pad_token="<pad>", eos_token="<eos>")
    llama = tiny_llama(3).model
    teacher = cut_teacher(llama, tokenizer, (1, 2))
    assert len(decoder_blocks(llama)) == 2 and teacher.num_layers == 3
    assert isinstance(llama.norm, nn.Identity)  # hidden_states[2] is not after the final norm
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2))
    cut_teacher(gpt2, tokenizer, (1,))
    assert len(decoder_blocks(gpt2)) == 1 and len(gpt2.transformer.h) == 1


@pytest.mark.parametrize(
    ("model_id", "is_path"),
    [
        ("./qwen", True),
        ("../models/qwen", True),
        ("/opt/models/qwen", True),
        ("~/models/qwen", True),
        ("data/teachers/tiny-qwen3", True),  # more than one `/`: no hub id has that
        ("models/qwen", True),  # models/ exists (made below)
        ("nothere/qwen", False),
        ("Qwen/Qwen3-0.6B", False),
        ("gpt2", False),
    ],
)
def test_a_model_param_looks_like_a_path_or_a_hub_id(tmp_path, monkeypatch, model_id, is_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_like_path(model_id) == is_path


def test_a_missing_model_folder_is_named_with_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_teacher("data/teachers/gone", "main", (1,), model_key="directions.model")
    assert str(err.value) == "model folder not found: data/teachers/gone (directions.model)"
    with pytest.raises(
        FileNotFoundError, match=r"^model folder not found: \./m \(steering\.model\)$"
    ):
        load_causal_lm("./m", "main", model_key="steering.model")


@pytest.mark.parametrize(
    "model_id",
    # The second is the tiny profile's packaged teacher by its hub id: online it loads the
    # same weights; offline (no hub cache) it fails fast with the same message.
    ["no-such-org/no-such-model", "sentence-transformers/all-MiniLM-L6-v2"],
)
def test_an_unreachable_hub_id_keeps_its_message(monkeypatch, model_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(TeacherLoadError) as err:
        load_teacher(model_id, "main", (1,), model_key="directions.model")
    assert time.perf_counter() - started < 10, "offline must fail fast, not retry"
    message = str(err.value)
    assert f"cannot load model {model_id!r}" in message
    assert "as a Hugging Face hub id" in message and "make demo" in message


def test_an_uncached_hub_id_offline_fails_at_once_naming_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(OSError, match="is not in the local Hugging Face cache .* HF_HUB_OFFLINE"):
        pretrained(AutoTokenizer, "no-such-org/no-such-model", "main", cache_dir=tmp_path)
    assert time.perf_counter() - started < 2
    with pytest.raises(TeacherLoadError, match="`hf download Qwen/Qwen3-0.6B --local-dir"):
        load_teacher("no-such-org/no-such-model", "main", (1,))


def test_a_hub_id_in_the_local_cache_loads_without_the_network(tmp_path, tiny_llama_path):
    """The cache layout huggingface_hub writes: refs/main names a snapshot folder."""
    repo = tmp_path / "models--org--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_llama_path, repo / "snapshots" / commit)
    # Online mode, but the cached copy is found first: no probe, no download.
    tokenizer = pretrained(AutoTokenizer, "org/tiny", "main", cache_dir=tmp_path)
    model = pretrained(AutoModel, "org/tiny", "main", cache_dir=tmp_path)
    assert tokenizer.vocab_size == AutoTokenizer.from_pretrained(tiny_llama_path).vocab_size
    reference = AutoModel.from_pretrained(tiny_llama_path)
    assert model.config.num_hidden_layers == reference.config.num_hidden_layers


def test_the_prefix_cache_and_ending_scores_use_the_current_cache_api(tiny_qwen3_path):
    """No `past_key_values` (deprecated for `cache` in transformers 5): no FutureWarning
    and no transformers log line (its `warning_once` memo cleared first, so an earlier
    test that printed it cannot hide it here)."""
    logging.Logger.warning_once.cache_clear()
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    hf_logger = transformers.utils.logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            teacher = load_teacher(tiny_qwen3_path, None, (2,))
            prefix = teacher.prefix_cache([1, 2, 3])
            ids, mask = torch.tensor([[4, 5], [6, 7]]), torch.ones(2, 2, dtype=torch.long)
            continued = teacher.hidden_at(ids, mask, prefix)[2]
            whole = teacher.hidden_at(torch.tensor([[1, 2, 3, 4, 5]]), torch.ones(1, 5))[2]
            model, _ = load_causal_lm(tiny_qwen3_path, None)
            batch = McBatch(
                torch.tensor([[1, 2, 3]]),
                torch.ones(1, 3, dtype=torch.long),
                torch.tensor([[4], [5], [6], [7]]),
                torch.ones(4, 1, dtype=torch.long),
                torch.tensor([0]),
            )
            scores = ending_scores(model, batch)
    finally:
        hf_logger.removeHandler(handler)
    assert "deprecated" not in records.getvalue()
    # The cached prefix gives what the whole sequence gives at the continued positions.
    assert torch.allclose(continued[0], whole[0, 3:], atol=1e-5)
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits[0, 2].log_softmax(-1)
    assert scores[0, 0].item() == pytest.approx(logits[4].item(), abs=1e-5)
    # The check can fail: the deprecated name still warns in the installed transformers.
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
        model.model(input_ids=torch.tensor([[1, 2]]), past_key_values=None, use_cache=False)
