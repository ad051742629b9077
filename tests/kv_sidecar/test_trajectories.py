"""The trajectories stage: K/V/Q and forces against an independent reference, shards, layout.

The reference never uses `pipeline.trajectories`: it feeds the whole chunk to the
model, takes the cross-entropy of the future positions' logits, reads the k/v/q
projections and block inputs with plain hooks, and applies the rotary embedding
itself (HF's half-rotation convention, inv_freq = theta^(-2i/d)).
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch

from pipeline.common.identity import folder_sha256
from pipeline.common.params import build
from pipeline.common.scratch import SCRATCH
from pipeline.common.shards import Manifest, read_shard
from pipeline.inputs import corpus
from pipeline.inputs.params import CorpusParams
from pipeline.inputs.text_chunks import CorpusChunks
from pipeline.inputs.tiny_models import build_tiny
from pipeline.kv_sidecar import trajectories
from pipeline.kv_sidecar.forces import (
    Sizes,
    bytes_per_chunk,
    bytes_per_window,
    layer_shapes,
    trajectory_batch,
)
from pipeline.kv_sidecar.layout import TRAJECTORIES, trajectory_key
from pipeline.kv_sidecar.params import TrajectoriesParams
from tests.tiny_teachers import tiny_teacher

GEOMETRY = dict(window_size=6, num_windows=2, num_queries=4)  # chunks of 12 + 4 + 1 tokens
N, Q = 12, 4
CHUNK = N + Q + 1
# TinyLlama-1.1B: 32 query heads, 4 KV heads, head_dim 64, hidden 2048; the seed's windows.
TINYLLAMA = Sizes(64, 4, 16, 32, 4, 64, 2048)


def rms_norm_in_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.fixture(scope="module")
def model64():
    """The tiny Llama in float64 throughout: HF's RMSNorm computes in float32 whatever the
    input dtype, which would leave float32 noise (~1e-4 relative) in finite differences."""
    model, _ = build_tiny("llama")
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(rms_norm_in_input_dtype, module)
    return model.double().requires_grad_(False)


@pytest.fixture(scope="module")
def model32():
    model, _ = build_tiny("llama")
    return model.requires_grad_(False)


def rope(x: torch.Tensor, theta: float, grad: bool = False) -> torch.Tensor:
    """x (T, H, D) at positions 0..T-1, rotated by the model's RoPE convention. Angles in
    float32 as the model computes them, whatever the model's dtype.

    grad=True maps a gradient w.r.t. the pre-RoPE x to the gradient w.r.t. the rotated x:
    dL/d(Rx) = R^-T dL/dx, and R^-T = R / (cos^2 + sin^2), which is R up to float32 rounding.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(x.shape[0], dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(x.dtype)  # (T, 1, D)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(x.dtype)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    out = x * cos + rotated * sin
    return out / (cos**2 + sin**2) if grad else out


def hf_loss(model, chunk: torch.Tensor, perturb=None, start: int = 0):
    """The whole chunk (T = start+N+Q+1) through the model; mean cross-entropy of the logits
    at positions start+N..start+N+Q-1 against the tokens that follow them, in the model's
    dtype (HF's own `labels` loss would upcast float64 logits to float32 only)."""
    embeds = model.get_input_embeddings()(chunk[None]).detach().requires_grad_(True)
    handles = perturb(model) if perturb else []
    try:
        logits = model(inputs_embeds=embeds).logits[0]  # (T, V)
    finally:
        for handle in handles:
            handle.remove()
    future = slice(start + N, start + N + Q)
    return torch.nn.functional.cross_entropy(logits[future], chunk[start + N + 1 :])


def reference(model, chunk: torch.Tensor, layer: int, start: int = 0) -> dict[str, torch.Tensor]:
    """Pre-RoPE q/k/v projections, the block input, o_proj input and their LM-loss grads."""
    cfg = model.config
    block = model.model.layers[layer]
    seen = {}

    def keep(name):
        return lambda module, args, out: seen.__setitem__(name, out)

    def perturb(_):
        attn = block.self_attn
        return [
            attn.q_proj.register_forward_hook(keep("q")),
            attn.k_proj.register_forward_hook(keep("k")),
            attn.v_proj.register_forward_hook(keep("v")),
            attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0])),
            block.register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__("h", a[0] if a else kw["hidden_states"]),
                with_kwargs=True,
            ),
        ]

    loss = hf_loss(model, chunk, perturb, start)
    names = ["q", "k", "v", "h"]
    grads = torch.autograd.grad(loss, [seen[n] for n in names])  # each (1, T, width)
    grads = {name: grad[0] for name, grad in zip(names, grads, strict=True)}
    d, theta = cfg.head_dim, cfg.rope_parameters["rope_theta"]

    def heads(x):
        return x.detach().reshape(x.shape[-2], -1, d)  # (T, H, D)

    return {
        "loss": loss.detach(),
        "keys": rope(heads(seen["k"]), theta),
        "values": heads(seen["v"]),
        "queries": rope(heads(seen["q"]), theta),
        "o_in": seen["o_in"][0].detach(),
        "force_keys": rope(heads(grads["k"]), theta, grad=True),
        "force_values": heads(grads["v"]),
        "force_queries_kv": rope(heads(grads["q"]), theta, grad=True),
        "force_queries_hidden": grads["q"],
        "force_hidden": grads["h"],
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_chunks(batch: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    shape = (batch, start + CHUNK)
    return torch.randint(2, 2000, shape, generator=torch.Generator().manual_seed(seed))


# --- the library: forces and stored tensors against the independent reference (float64) ---


@pytest.mark.parametrize("force_space", ["kv", "hidden"])
def test_forces_equal_autograd_of_the_future_token_loss(model64, force_space):
    sizes = Sizes.of(model64.config, **GEOMETRY)
    chunks = random_chunks(3)
    layers = (0, 2, 3)
    stored, losses = trajectory_batch(model64, chunks, layers, sizes, force_space)
    for b in range(3):  # each chunk alone: the batch's backward keeps chunks apart
        for layer in layers:
            ref = reference(model64, chunks[b], layer)
            assert torch.allclose(losses[b], ref["loss"], rtol=1e-12)
            got = {
                name: stored[trajectory_key(layer, name)][b]
                for name in layer_shapes(sizes, force_space)
            }
            expected = {"keys": ref["keys"][:N], "values": ref["values"][:N],
                        "queries": ref["queries"][N : N + Q]}  # fmt: skip
            if force_space == "kv":
                expected |= {
                    "force_keys": ref["force_keys"][:N],
                    "force_values": ref["force_values"][:N],
                    "force_queries": ref["force_queries_kv"][N : N + Q],
                }
            else:
                expected |= {
                    "force_hidden": ref["force_hidden"][:N],
                    "force_queries": ref["force_queries_hidden"][N : N + Q],
                }
            for name, value in expected.items():
                assert got[name].shape == value.shape, name
                assert rel_err(got[name], value) < 1e-10, f"{name} layer {layer} chunk {b}"


def test_one_force_component_matches_a_central_finite_difference(model64):
    sizes = Sizes.of(model64.config, **GEOMETRY)
    chunk = random_chunks(1, seed=5)
    kv, _ = trajectory_batch(model64, chunk, (1,), sizes, "kv")
    hidden, _ = trajectory_batch(model64, chunk, (2,), sizes, "hidden")
    eps, d = 1e-4, model64.config.head_dim
    position, head, dim = 7, 1, 3  # a window token of the second window, KV head 1

    def on_value(sign):
        def add(module, args, out):
            out = out.clone()
            out[0, position, head * d + dim] += sign * eps
            return out

        return lambda m: [m.model.layers[1].self_attn.v_proj.register_forward_hook(add)]

    def on_hidden(sign):
        def add(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[0, position, 5] += sign * eps
            return ((h, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": h})

        return lambda m: [m.model.layers[2].register_forward_pre_hook(add, with_kwargs=True)]

    for perturb, force in (
        (on_value, kv["layer1.force_values"][0, position, head, dim]),
        (on_hidden, hidden["layer2.force_hidden"][0, position, 5]),
    ):
        with torch.no_grad():
            plus, minus = (hf_loss(model64, chunk[0], perturb(s)) for s in (1, -1))
        numeric = (plus - minus) / (2 * eps)
        assert abs(float(force)) > 1e-6, "pick a component the loss depends on"
        assert math.isclose(float(force), float(numeric), rel_tol=1e-7), (force, numeric)


@pytest.mark.parametrize("force_space", ["kv", "hidden"])
def test_a_start_token_is_a_dense_prefix_before_the_stored_windows(model64, force_space):
    """With start_tokens 1, position 0 is read by the model but lies outside the windows:
    the windows are positions 1..N, the future 1+N..N+Q, and the loss is theirs."""
    sizes = Sizes.of(model64.config, **GEOMETRY, start_tokens=1)
    assert sizes.chunk_tokens == 1 + CHUNK
    chunks = random_chunks(2, seed=7, start=1)
    chunks[:, 0] = 0  # <|endoftext|>, as corpus.start_token: auto puts it
    stored, losses = trajectory_batch(model64, chunks, (1,), sizes, force_space)
    window, future = slice(1, 1 + N), slice(1 + N, 1 + N + Q)
    for b in range(2):
        ref = reference(model64, chunks[b], 1, start=1)
        assert torch.allclose(losses[b], ref["loss"], rtol=1e-12)
        expected = {"keys": ref["keys"][window], "queries": ref["queries"][future]}
        if force_space == "kv":
            expected |= {"force_values": ref["force_values"][window],
                         "force_queries": ref["force_queries_kv"][future]}  # fmt: skip
        else:
            expected |= {"force_hidden": ref["force_hidden"][window]}
        for name, value in expected.items():
            got = stored[trajectory_key(1, name)][b]
            assert got.shape == value.shape and rel_err(got, value) < 1e-10, name
        # Must fail: the windows read from position 0, as without a prefix, are other tokens.
        assert rel_err(stored["layer1.keys"][b], ref["keys"][:N]) > 0.1
    with pytest.raises(ValueError, match=r"chunks must be \(B, 18\) = start_tokens \+"):
        trajectory_batch(model64, chunks[:, 1:], (1,), sizes, force_space)


def test_kv_queries_are_the_hidden_space_queries_rotated(model64):
    """Both spaces' dL/dQ: the same numbers up to RoPE, so equal norms per position."""
    sizes = Sizes.of(model64.config, **GEOMETRY)
    chunks = random_chunks(2, seed=3)
    kv, _ = trajectory_batch(model64, chunks, (3,), sizes, "kv")
    hidden, _ = trajectory_batch(model64, chunks, (3,), sizes, "hidden")
    a = kv["layer3.force_queries"].flatten(2).norm(dim=-1)
    b = hidden["layer3.force_queries"].norm(dim=-1)
    assert torch.allclose(a, b, rtol=1e-10)


# --- the stage: shards, manifest, GQA, bad input (resumption: tests/common/test_extraction.py) ---


def traj_params(**overrides) -> TrajectoriesParams:
    base = dict(model=tiny_teacher("llama"), layers=(0, 3), max_chunks=10, compute_dtype="float32",
                storage_dtype="float32", shard_rows=3, batch_size=2, force_space="kv")  # fmt: skip
    return TrajectoriesParams(**(GEOMETRY | base | overrides))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    params = CorpusParams(source="builtin", model=tiny_teacher("llama"), chunk_tokens=CHUNK,
                          max_chunks=12, start_token="none")  # fmt: skip
    corpus.run(params, out)
    return out


@pytest.fixture(scope="module")
def start_corpus(tmp_path_factory) -> Path:
    """Chunks led by <|endoftext|> (corpus.start_token: auto): 1 + CHUNK tokens."""
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    params = CorpusParams(source="builtin", model=tiny_teacher("llama"), chunk_tokens=1 + CHUNK,
                          max_chunks=3, start_token="auto")  # fmt: skip
    corpus.run(params, out)
    return out


@pytest.fixture(scope="module")
def kv_run(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kv") / "trajectories"
    trajectories.run(traj_params(), corpus_dir, out)
    return out


def load_all(folder: Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    manifest = Manifest.load(folder, kind=TRAJECTORIES)
    shards = [read_shard(folder, record) for record in manifest.shards]
    return manifest, {name: torch.cat([s[name] for s in shards]) for name in shards[0]}


@pytest.mark.parametrize("force_space", ["kv", "hidden"])
def test_shards_follow_the_layout(corpus_dir, tmp_path, force_space):
    params = traj_params(force_space=force_space, storage_dtype="bfloat16", layers="all")
    stats = trajectories.run(params, corpus_dir, tmp_path / "out")
    manifest, data = load_all(tmp_path / "out")
    # kv_sidecar/layout.py at tiny size: W*S = 12, Q = 4, 2 KV heads, 8 query heads, 8 x 8 = 64.
    layout = {"keys": (12, 2, 8), "values": (12, 2, 8), "queries": (4, 8, 8)} | {
        "hidden": {"force_hidden": (12, 64), "force_queries": (4, 64)},
        "kv": {"force_keys": (12, 2, 8), "force_values": (12, 2, 8), "force_queries": (4, 8, 8)},
    }[force_space]
    names = {trajectory_key(layer, name) for layer in range(4) for name in layout}
    assert set(data) == {"chunk_id"} | names
    assert data["chunk_id"].dtype == torch.int64 and data["chunk_id"].tolist() == list(range(10))
    for layer in range(4):
        for name, shape in layout.items():
            tensor = data[trajectory_key(layer, name)]
            assert tensor.dtype == torch.bfloat16 and tensor.shape == (10, *shape), name
    sizes = Sizes(6, 2, 4, 8, 2, 8, 64)
    assert [r.rows for r in manifest.shards] == [3, 3, 3, 1]
    extra = manifest.extra
    assert {k: extra[k] for k in ("n_heads", "n_kv_heads", "head_dim", "hidden_size")} == {
        "n_heads": 8, "n_kv_heads": 2, "head_dim": 8, "hidden_size": 64}  # fmt: skip
    assert extra["layers"] == [0, 1, 2, 3] and extra["force_space"] == force_space
    assert extra["rope"] == "after" and "what the attention function consumes" in extra["rope_note"]
    assert extra["kv_head_of_query_head"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (extra["window_size"], extra["num_windows"], extra["num_queries"]) == (6, 2, 4)
    assert extra["model"] == tiny_teacher("llama") and extra["revision"] is None
    assert extra["model_sha256"] == folder_sha256(Path(tiny_teacher("llama")))
    assert stats["bytes"] == 10 * 4 * bytes_per_chunk(sizes, force_space, 2)  # the logged plan
    assert math.isclose(extra["lm_loss_mean"], stats["lm_loss_mean"], abs_tol=1e-6)
    assert not (tmp_path / SCRATCH).exists()


def test_stored_kvq_and_forces_equal_the_models_attention_gqa_included(kv_run, corpus_dir, model32):
    manifest, data = load_all(kv_run)
    chunks = CorpusChunks(corpus_dir).read(0, manifest.extra["num_chunks"])
    group = manifest.extra["kv_head_of_query_head"]
    d = manifest.extra["head_dim"]
    for b in (0, 7):
        for layer in (0, 3):
            ref = reference(model32, chunks[b], layer)
            for name, expected in (
                ("keys", ref["keys"][:N]),
                ("values", ref["values"][:N]),
                ("queries", ref["queries"][N : N + Q]),
                ("force_keys", ref["force_keys"][:N]),
                ("force_values", ref["force_values"][:N]),
                ("force_queries", ref["force_queries_kv"][N : N + Q]),
            ):
                got = data[trajectory_key(layer, name)][b]
                assert rel_err(got, expected) < 1e-5, f"{name} layer {layer} chunk {b}"
            # GQA: query head h attends with KV head group[h]; stored window K/V plus the
            # future tokens' own K/V reproduce the attention output the model computed.
            keys = torch.cat([data[trajectory_key(layer, "keys")][b], ref["keys"][N:]])
            values = torch.cat([data[trajectory_key(layer, "values")][b], ref["values"][N:]])
            queries = data[trajectory_key(layer, "queries")][b]  # (Q, H, D)
            for mapping, should_match in ((group, True), ([h % 2 for h in range(8)], False)):
                out = []
                for h, g in enumerate(mapping):
                    scores = queries[:, h] @ keys[:, g].T / math.sqrt(d)  # (Q, T)
                    causal = torch.arange(keys.shape[0])[None] > torch.arange(N, N + Q)[:, None]
                    weights = scores.masked_fill(causal, -torch.inf).softmax(-1)
                    out.append(weights @ values[:, g])  # (Q, D)
                attended = torch.stack(out, 1).flatten(1)  # (Q, H*D)
                match = rel_err(attended, ref["o_in"][N : N + Q]) < 1e-5
                assert match == should_match, f"mapping {mapping} layer {layer}"


def test_corpus_of_another_geometry_or_model_is_refused(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="chunks of 17 tokens but trajectories needs .* 18"):
        trajectories.run(traj_params(num_queries=5), corpus_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="tokenized for '.*tiny-llama' but trajectories.model"):
        trajectories.run(traj_params(model="other/model"), corpus_dir, tmp_path / "out")


def test_the_stage_reads_start_tokens_from_the_corpus_and_records_them(
    start_corpus, corpus_dir, tmp_path, model32
):
    params = traj_params(layers=(2,), max_chunks=3)
    trajectories.run(params, start_corpus, tmp_path / "start")
    manifest, data = load_all(tmp_path / "start")
    assert manifest.extra["start_tokens"] == 1 and "P = start_tokens" in manifest.extra["loss"]
    chunk = CorpusChunks(start_corpus).read(0, 1)[0]
    ref = reference(model32, chunk, 2, start=1)
    assert rel_err(data["layer2.keys"][0], ref["keys"][1 : 1 + N]) < 1e-5
    assert math.isclose(manifest.extra["lm_loss_mean"] * 3, sum(
        float(reference(model32, c, 2, start=1)["loss"])
        for c in CorpusChunks(start_corpus).read(0, 3)), rel_tol=1e-5)  # fmt: skip
    trajectories.run(params, corpus_dir, tmp_path / "plain")
    assert Manifest.load(tmp_path / "plain", kind=TRAJECTORIES).extra["start_tokens"] == 0
    # A geometry that leaves no room for the prefix: the message names the rule.
    with pytest.raises(ValueError) as error:
        trajectories.run(traj_params(max_chunks=3, num_queries=5), start_corpus, tmp_path / "x")
    assert str(error.value).endswith(
        "holds chunks of 18 tokens but trajectories needs corpus start tokens + "
        "trajectories.num_windows * window_size + num_queries + 1 = 1 + 2 * 6 + 5 + 1 = 19: "
        "set corpus.chunk_tokens to match and re-run the corpus stage"
    )


def test_batch_size_does_not_change_the_values(corpus_dir, tmp_path, kv_run):
    trajectories.run(traj_params(batch_size=3), corpus_dir, tmp_path / "out")
    _, a = load_all(kv_run)
    _, b = load_all(tmp_path / "out")
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), rtol=1e-5, atol=1e-7), name


# --- disk use at TinyLlama size ---


def test_bytes_per_window_at_tinyllama_size():
    # Per layer, bf16. K, V: 64 tokens x 4 KV heads x 64; Q: 16 x 32 x 64 per chunk of 4 windows.
    kvq = 2 * (2 * 64 * 4 * 64 + 16 * 32 * 64 / 4)  # 81,920 bytes
    assert bytes_per_window(TINYLLAMA, "hidden", 2) == kvq + 2 * (64 * 2048 + 16 * 2048 / 4)
    assert bytes_per_window(TINYLLAMA, "hidden", 2) == 360_448
    assert bytes_per_window(TINYLLAMA, "kv", 2) == 163_840
    assert bytes_per_window(TINYLLAMA, "hidden", 2, forces_only=True) == 278_528
    assert bytes_per_window(TINYLLAMA, "kv", 2, forces_only=True) == 81_920
    assert bytes_per_chunk(TINYLLAMA, "kv", 4) == 2 * 4 * bytes_per_window(TINYLLAMA, "kv", 2)
    # All 22 layers, per window: 7.9 MB in hidden space, 3.6 MB in kv space.
    assert 22 * bytes_per_window(TINYLLAMA, "hidden", 2) == 7_929_856
    assert 22 * bytes_per_window(TINYLLAMA, "kv", 2) == 3_604_480


def test_kv_forces_are_over_10x_smaller_per_kv_head_at_tinyllama_size():
    """What one KV head's window sample needs: hidden space carries the whole 2048-d dL/dh
    per token (it mixes every head), kv space that head's dL/dK and dL/dV (2 x 64)."""
    s = TINYLLAMA
    hidden_force = layer_shapes(s, "hidden")["force_hidden"]  # (256, 2048)
    kv_force = layer_shapes(s, "kv")["force_keys"]  # (256, 4, 64), and as many for V
    per_head_hidden = math.prod(hidden_force)
    per_head_kv = 2 * math.prod(kv_force) // s.n_kv_heads
    assert per_head_hidden / per_head_kv == 16 >= 10
    # Per K or V alone (DESIGN's "64-d vs 2048-d"): 32x. Over the whole layer, K and V of
    # all 4 KV heads against dL/dh: 4x; with the query forces (same size in both): 3.4x.
    assert per_head_hidden / (per_head_kv // 2) == 32
    assert math.prod(hidden_force) / (2 * math.prod(kv_force)) == 4
    ratio = bytes_per_window(s, "hidden", 2, True) / bytes_per_window(s, "kv", 2, True)
    assert ratio == 3.4


def test_layers_take_a_list_or_all_and_name_the_key_otherwise():
    def layers(value):
        return build(TrajectoriesParams, {"layers": value}, "trajectories").layers

    assert layers("all") == "all" and layers([3, 1]) == (3, 1) and layers(2) == (2,)
    with pytest.raises(ValueError, match="trajectories.layers must be one of \\['all'\\]"):
        layers("every")
    with pytest.raises(ValueError, match="trajectories.layers holds -1"):
        layers([-1])
