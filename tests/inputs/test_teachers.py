"""Stage `teachers`: tiny teachers written as model folders that load by path."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.common.params import sections_from_dict
from pipeline.inputs import teachers
from pipeline.inputs.params import TeachersParams
from pipeline.inputs.tiny_models import build_tiny


def test_a_built_folder_loads_by_path_and_equals_the_recipe(tiny_teachers):
    folder = tiny_teachers["qwen3"]
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    reference, reference_tokenizer = build_tiny("qwen3")
    assert type(model) is type(reference)
    assert model.dtype == torch.float32
    assert tokenizer.get_vocab() == reference_tokenizer.get_vocab()
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|pad|>", "<|endoftext|>")

    texts = ["apple", "The word: river"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    expected = reference_tokenizer(texts, return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
        reference_logits = reference(**expected).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(reference_tokenizer))
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)


def test_stage_writes_one_folder_per_teacher_and_an_index(tmp_path):
    out = tmp_path / "teachers"
    (out / "stale").mkdir(parents=True)  # left by an earlier run with other params
    built = teachers.run(TeachersParams(tiny={"small": "llama"}), out)
    assert built == {"small": "llama"}
    assert sorted(p.name for p in out.iterdir()) == ["small", "teachers.json"]
    assert json.loads((out / "teachers.json").read_text()) == {"tiny": {"small": "llama"}}
    config = json.loads((out / "small" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2


def test_the_real_experiment_builds_nothing(tmp_path):
    assert teachers.run(TeachersParams(), tmp_path / "t") == {}
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["teachers.json"]


@pytest.mark.parametrize(
    ("tiny", "message"),
    [
        ({"x": "gpt2"}, "teachers.tiny.x must be one of ['qwen3', 'llama'], got 'gpt2'"),
        ({"../x": "qwen3"}, "teachers.tiny key '../x' must be a plain folder name"),
    ],
)
def test_bad_teachers_are_named(tiny, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sections_from_dict({"teachers": {"tiny": tiny}})


def test_unknown_recipe_is_refused_by_the_builder():
    with pytest.raises(ValueError, match="unknown tiny teacher recipe 'nope'; known: qwen3, llama"):
        build_tiny("nope")
