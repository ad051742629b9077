"""Benchmark `trajectories` against the plain transformers way, side by side in one run.

Model: TinyLlama-1.1B's architecture (hidden 2048, 22 layers, 32 heads, 4 KV heads,
MLP 5632, vocab 32,000) with random, seeded weights. Chunks: the seed's geometry
(4 windows x 64 tokens + 16 future queries + 1 label token) of random token ids.

Baseline, written the way a user would: the full model with trainable parameters
(so the backward also fills every weight's .grad), `output_hidden_states=True` with
`retain_grad()` on every layer's input, K/V/Q read from the k/v/q projections
(before RoPE) by forward hooks, logits at every position, one chunk at a time,
`loss.backward()`. Project: `pipeline.trajectories.trajectory_batch` (frozen
weights, post-RoPE K/V/Q, logits only at the future positions, one
`torch.autograd.grad` per batch), in each force space.

    python bench/bench_trajectories.py --chunks 4 --layers 0,11,21
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.common.teacher import DTYPES
from pipeline.kv_sidecar.forces import Sizes, bytes_per_window, trajectory_batch


def tinyllama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32_000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def baseline_chunk(model, chunk: torch.Tensor, layers: list[int], sizes: Sizes) -> dict:
    """One chunk the plain way; returns what it would store (hidden-space forces)."""
    n, q = sizes.window_tokens, sizes.num_queries
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        attn = model.model.layers[layer].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):

            def grab(module, args, output, key=f"{layer}.{name}"):
                output.retain_grad()
                captured[key] = output

            handles.append(getattr(attn, name).register_forward_hook(grab))
    inputs, labels = chunk[None, :-1], chunk[None, n + 1 :]
    out = model(input_ids=inputs, output_hidden_states=True)
    for layer in layers:
        out.hidden_states[layer].retain_grad()
    logits = out.logits[:, n : n + q]  # at the future positions, predicting the next token
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    loss.backward()
    for handle in handles:
        handle.remove()
    stored = {}
    for layer in layers:
        stored[f"{layer}.keys"] = captured[f"{layer}.k_proj"][:, :n].detach()
        stored[f"{layer}.values"] = captured[f"{layer}.v_proj"][:, :n].detach()
        stored[f"{layer}.queries"] = captured[f"{layer}.q_proj"][:, n:].detach()
        stored[f"{layer}.force_hidden"] = out.hidden_states[layer].grad[:, :n]
        stored[f"{layer}.force_queries"] = captured[f"{layer}.q_proj"].grad[:, n:]
    model.zero_grad(set_to_none=True)
    return stored


def chunks_per_second(fn, chunks: torch.Tensor, batch_size: int) -> float:
    fn(chunks[:1])  # warm-up: allocator and kernels
    start = time.perf_counter()
    for i in range(0, len(chunks), batch_size):
        fn(chunks[i : i + batch_size])
    return len(chunks) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", default="0,11,21")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    config = tinyllama_config()
    sizes = Sizes.of(config, window_size=64, num_windows=4, num_queries=16)
    layers = [int(x) for x in args.layers.split(",")]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DTYPES[args.dtype]).eval()
    chunks = torch.randint(0, config.vocab_size, (args.chunks, sizes.chunk_tokens))

    def baseline(batch: torch.Tensor) -> None:
        for chunk in batch:
            baseline_chunk(model, chunk, layers, sizes)

    results = {"chunks": args.chunks, "layers": layers, "dtype": args.dtype}
    results["baseline_chunks_per_s"] = chunks_per_second(baseline, chunks, 1)
    model.requires_grad_(False)
    for space in ("hidden", "kv"):

        def project(batch: torch.Tensor, space=space) -> None:
            trajectory_batch(model, batch, layers, sizes, space)

        rate = chunks_per_second(project, chunks, args.batch_size)
        results[f"project_{space}_chunks_per_s"] = rate
        results[f"project_{space}_speedup"] = rate / results["baseline_chunks_per_s"]
        results[f"bytes_per_window_per_layer_{space}_bf16"] = bytes_per_window(sizes, space, 2)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
