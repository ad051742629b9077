"""Model identities, input-file hashes and `compute_dtype: auto`, on hand-built inputs
(no network: the hub client and the CPU flags are faked)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from pipeline.common.identity import (
    cached_commit,
    cpu_flags,
    files_sha256,
    folder_sha256,
    model_identity,
    resolve_compute_dtype,
)
from pipeline.common.params import load_params

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def folder(tmp_path) -> Path:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_bytes(b"{}")
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    return model


def test_a_folder_hash_is_sha256_over_sorted_relative_paths_and_file_hashes(folder):
    expected = sha(f"config.json\0{sha(b'{}')}\nsub/weights.bin\0{sha(bytes([0, 1]))}\n".encode())
    assert folder_sha256(folder) == expected
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("tools write here")
    assert folder_sha256(folder) == expected, "hidden entries are not the model"


def test_a_folder_hash_changes_with_one_byte_and_with_a_rename(folder):
    before = folder_sha256(folder)
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    edited = folder_sha256(folder)
    assert edited != before
    (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    assert folder_sha256(folder) == before
    (folder / "sub" / "weights.bin").rename(folder / "sub" / "other.bin")
    assert folder_sha256(folder) not in (before, edited)


def test_a_local_folder_is_identified_by_its_content(folder):
    found = model_identity(str(folder), "main", "directions.model")
    assert found.revision is None and found.sha256 == folder_sha256(folder)
    assert found.manifest() == {"revision": None, "model_sha256": found.sha256}


def test_a_missing_local_folder_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        model_identity(str(tmp_path / "gone"), "main", "steering.model")
    assert str(err.value) == f"model folder not found: {tmp_path / 'gone'} (steering.model)"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An HF cache holding ref `main` of org/model -> COMMIT."""
    cache = tmp_path / "hub"
    refs = cache / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def offline(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: value)


def no_hub(*args, **kwargs):
    raise AssertionError("the hub must not be asked")


def test_a_40_hex_revision_is_the_commit_without_asking_anyone(hub_cache, monkeypatch):
    offline(monkeypatch, False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_hub)
    found = model_identity("org/model", OTHER, "directions.model")
    assert (found.revision, found.sha256) == (OTHER, None)


def test_offline_a_branch_resolves_to_the_cached_ref(hub_cache, monkeypatch):
    offline(monkeypatch, True)
    monkeypatch.setattr(huggingface_hub, "model_info", no_hub)
    assert model_identity("org/model", "main", "corpus.model").revision == COMMIT
    assert cached_commit("org/model", "v2") is None


def test_offline_and_uncached_fails_in_one_line_naming_key_and_model(hub_cache, monkeypatch):
    offline(monkeypatch, True)
    with pytest.raises(OSError) as err:
        model_identity("org/other", "main", "trajectories.model")
    message = str(err.value)
    assert message.startswith("trajectories.model='org/other': revision 'main' is not in ")
    assert "\n" not in message


def test_online_the_hub_answers_and_the_cache_is_the_fallback(hub_cache, monkeypatch):
    offline(monkeypatch, False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: SimpleNamespace(sha=OTHER))
    assert model_identity("org/model", "main", "directions.model").revision == OTHER

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    assert model_identity("org/model", "main", "directions.model").revision == COMMIT
    with pytest.raises(OSError, match=r"^steering.model='org/other': the hub .* unreachable"):
        model_identity("org/other", "main", "steering.model")


def test_files_are_hashed_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    found = files_sha256([tmp_path / "b.txt", tmp_path / "a.txt"])
    assert list(found.items()) == [
        (str(tmp_path / "a.txt"), sha(b"a")),
        (str(tmp_path / "b.txt"), sha(b"b")),
    ]


CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        (CPU, {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
        (CPU, {"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
        (CPU, {"avx2", "avx512f"}, "float32"),  # bf16 emulated: tens of times slower
        (CPU, set(), "float32"),
        (torch.device("cuda:0"), set(), "bfloat16"),
        (torch.device("mps"), {"avx512_bf16"}, "float32"),
    ],
)
def test_auto_resolves_by_device_and_cpu_flags(device, flags, expected):
    assert resolve_compute_dtype("auto", device, flags) == expected


def test_an_explicit_dtype_is_kept_and_a_bad_one_names_the_key():
    assert resolve_compute_dtype("float32", torch.device("cuda"), {"avx512_bf16"}) == "float32"
    with pytest.raises(ValueError, match=r"^directions.compute_dtype must be auto, float32"):
        resolve_compute_dtype("bf16", CPU, set(), key="directions.compute_dtype")


def test_the_cpu_flags_are_the_first_flags_line_of_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags\t\t: fpu avx2 avx512_bf16\n\nflags : fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "none") == set()


def test_params_accept_auto_and_a_bad_dtype_names_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("directions: {compute_dtype: auto}\nsteering: {dtype: auto}\n")
    loaded = load_params(path)
    assert loaded.directions.compute_dtype == "auto" and loaded.steering.dtype == "auto"
    path.write_text("activations: {compute_dtype: bf16}\n")
    with pytest.raises(ValueError, match=r"activations\.compute_dtype"):
        load_params(path)
