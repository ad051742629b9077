"""Shared fixtures: seeding, a params factory, and a synthetic directions folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.common.params import Sections, sections_from_dict
from pipeline.common.shards import Manifest, shard_name
from pipeline.concepts.layout import KIND, write_shard_rows, write_side_files
from pipeline.inputs.tiny_models import RECIPES
from tests.tiny_teachers import tiny_teacher

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tests use tiny tensors; on two shared cores a second thread's spin-waiting makes
    # them up to 30x slower, and one thread gives the same results.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_teachers() -> dict[str, Path]:
    """Recipe -> model folder of each tiny teacher (what stage `teachers` writes)."""
    return {recipe: Path(tiny_teacher(recipe)) for recipe in RECIPES}


@pytest.fixture(scope="session")
def tiny_qwen3_path() -> str:
    return tiny_teacher("qwen3")


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    return tiny_teacher("llama")


def build_params(**sections) -> Sections:
    """Every params section from plain dicts, e.g. build_params(distill={"runs": {...}})."""
    return sections_from_dict(sections)


def concept_texts(offsets: torch.Tensor, flat: torch.Tensor) -> list[str]:
    """A synthetic concept's text spells its token ids ("t3t17"), one word per concept."""
    return [
        "".join(f"t{t}" for t in flat[offsets[i] : offsets[i + 1]].tolist())
        for i in range(offsets.numel() - 1)
    ]


def make_direction_set(
    folder: Path,
    num_concepts: int = 240,
    dim: int = 16,
    emb_dim: int = 8,
    vocab_size: int = 50,
    layer: int = 2,
    shard_rows: int = 64,
    seed: int = 0,
    texts: list[str] | None = None,
    layer_maps: dict[int, torch.Tensor] | None = None,
) -> Path:
    """A directions folder whose targets are a known linear map of mean token embeddings.

    Concept i uses 1-3 tokens; direction = W @ mean(embedding rows) (+ a constant
    activation offset that the train mean removes), so a linear probe can fit it.
    Its text is `texts[i]`, by default one that spells its token ids (`concept_texts`).
    `layer_maps` caches more layers: layer -> M (D, D), its activations are `layer`'s @ M.T.
    """
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    table = torch.randn(vocab_size, emb_dim, generator=gen)
    lengths = torch.randint(1, 4, (num_concepts,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.randint(1, vocab_size, (int(offsets[-1]),), generator=gen)
    weight = torch.randn(dim, emb_dim, generator=gen)
    pooled = torch.stack(
        [table[flat[offsets[i] : offsets[i + 1]]].mean(0) for i in range(num_concepts)]
    )
    activations = pooled @ weight.T + 3.0  # (N, D)
    layers = {layer: activations}
    layers |= {extra: activations @ m.T for extra, m in (layer_maps or {}).items()}
    split = torch.randint(0, 3, (num_concepts,), generator=gen).to(torch.int8)
    split[: num_concepts // 2] = 0  # mostly train, like 70/15/15
    records = []
    for index, start in enumerate(range(0, num_concepts, shard_rows)):
        stop = min(start + shard_rows, num_concepts)
        ids = torch.arange(start, stop)
        records.append(
            write_shard_rows(
                folder / shard_name(index),
                ids,
                split[start:stop],
                {key: values[start:stop] for key, values in layers.items()},
            )
        )
    used = torch.unique(flat)
    files = write_side_files(
        folder,
        means={key: values[split == 0].mean(0) for key, values in layers.items()},
        embedding_token_ids=used,
        embedding_rows=table[used],
        offsets=offsets,
        flat_tokens=flat,
        texts=concept_texts(offsets, flat) if texts is None else texts,
    )
    Manifest(
        kind=KIND,
        params={},
        shards=records,
        files=files,
        extra={
            "layers": list(layers),
            "vocab_size": vocab_size,
            "hidden_size": dim,
            "embedding_dim": emb_dim,
            "model": "synthetic",
            "pooling": "last",
            "teacher_caveat": "",
            "revision": None,
        },
    ).save(folder)
    return folder


@pytest.fixture
def direction_set(tmp_path) -> Path:
    return make_direction_set(tmp_path / "directions")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The model folder of the pinned all-MiniLM-L6-v2 wheel (profiles/tiny.yaml's
    teachers.packaged), as installed; skips where the wheel is not installed."""
    from pipeline.common.params import load_params
    from pipeline.inputs.packages import package_folder

    profile = Path(__file__).resolve().parents[1] / "profiles" / "tiny.yaml"
    packaged = load_params(profile).teachers.packaged["all-minilm-l6-v2"]
    try:
        found = package_folder(packaged.package, "teachers.packaged.all-minilm-l6-v2", "")
        return found / packaged.folder
    except FileNotFoundError as err:
        pytest.skip(f"the pinned MiniLM wheel is not installed (`make setup` installs it): {err}")
