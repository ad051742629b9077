"""Benchmark `trajectories` against the plain autograd way and TransformerLens, in one run.

Model: TinyLlama-1.1B's architecture (hidden 2048, 22 layers, 32 heads, 4 KV heads,
MLP 5632, vocab 32,000) with random, seeded weights. Chunks: the seed's geometry
(4 windows x 64 tokens + 16 future queries + 1 label token) of random token ids.

Methods, one chunk at a time for the two a user writes, each in its own process:
- `baseline`: the full model with trainable parameters (so the backward also
  fills every weight's .grad), `output_hidden_states=True` with `retain_grad()`
  on every stored layer's input, K/V/Q read from the k/v/q projections (before
  RoPE) by forward hooks, logits at every position, `loss.backward()`.
- `transformer_lens`: `TransformerBridge.boot_transformers(hf_model=...)`,
  forward hooks on `hook_rot_k` / `hook_rot_q` / `hook_v` (post-RoPE K and Q, V)
  and backward hooks on those and on `hook_resid_pre` / `hook_q` for the forces,
  `bridge.hooks(fwd_hooks=..., bwd_hooks=...)`, logits at every position,
  `loss.backward()` (TL's default trainable weights).
- `project_hidden`, `project_kv`: `pipeline.kv_sidecar.forces.trajectory_batch`
  (frozen weights, post-RoPE K/V/Q, logits only at the future positions, one
  forward and one `torch.autograd.grad` per batch), in each force space.

Every method's tensors of the first chunk are compared with the project's: the
same forces (and, for TransformerLens, the same post-RoPE K/V/Q).

    python -m bench.bench_trajectories --chunks 4 --layers 0,11,21 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from bench.flops import matmul_rate
from bench.machine import describe
from bench.processes import emit, memory_gb, model_memory_gb, reset_peak_memory, run_child
from pipeline.common.teacher import DTYPES
from pipeline.inputs.tiny_models import train_tokenizer
from pipeline.kv_sidecar.forces import Sizes, bytes_per_window, trajectory_batch
from pipeline.kv_sidecar.layout import trajectory_key

PEERS = {"transformer_lens": "transformer_lens"}
METHODS = ("project_hidden", "project_kv", "transformer_lens", "baseline")


def tinyllama_config(smoke: bool = False) -> LlamaConfig:
    """The real architecture; `smoke`: the same depth, 16x narrower (seconds on a CPU)."""
    width = 16 if smoke else 1
    return LlamaConfig(
        vocab_size=32_000 // width,
        hidden_size=2048 // width,
        intermediate_size=5632 // width,
        num_hidden_layers=22,
        num_attention_heads=32 // (4 if smoke else 1),
        num_key_value_heads=4 // (2 if smoke else 1),
        max_position_embeddings=2048,
    )


def baseline_chunk(model, chunk: torch.Tensor, layers: list[int], sizes: Sizes) -> dict:
    """One chunk the plain way: its hidden-space forces (its K/V/Q are before RoPE, not the
    tensors the project stores, so they are not compared)."""
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
        stored[trajectory_key(layer, "force_hidden")] = out.hidden_states[layer].grad[:, :n]
        stored[trajectory_key(layer, "force_q_proj")] = captured[f"{layer}.q_proj"].grad[:, n:]
    model.zero_grad(set_to_none=True)
    return stored


def transformer_lens_method(model, layers: list[int], sizes: Sizes):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0", hf_model=model, tokenizer=train_tokenizer(),
        device=model.device, dtype=model.dtype,
    )  # fmt: skip
    n, q = sizes.window_tokens, sizes.num_queries
    # TL hook -> (stored name, its slice): post-RoPE K/Q, V, and where the forces are read.
    values = {"attn.hook_rot_k": ("keys", slice(0, n)), "attn.hook_v": ("values", slice(0, n)),
              "attn.hook_rot_q": ("queries", slice(n, None))}  # fmt: skip
    grads = {"attn.hook_rot_k": ("force_keys", slice(0, n)),
             "attn.hook_v": ("force_values", slice(0, n)),
             "attn.hook_rot_q": ("force_queries", slice(n, None)),
             "hook_resid_pre": ("force_hidden", slice(0, n)),
             "attn.hook_q": ("force_q_proj", slice(n, None))}  # fmt: skip

    def one_chunk(chunk: torch.Tensor) -> dict:
        stored: dict[str, torch.Tensor] = {}

        def keeper(layer, name, rows):
            def keep(tensor, hook):
                stored[trajectory_key(layer, name)] = tensor[:, rows].detach()

            return keep

        fwd = [(f"blocks.{layer}.{hook}", keeper(layer, *kept)) for layer in layers
               for hook, kept in values.items()]  # fmt: skip
        bwd = [(f"blocks.{layer}.{hook}", keeper(layer, *kept)) for layer in layers
               for hook, kept in grads.items()]  # fmt: skip
        inputs, labels = chunk[None, :-1], chunk[None, n + 1 :]
        with bridge.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            logits = bridge(inputs)[:, n : n + q]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
            loss.backward()
        bridge.zero_grad(set_to_none=True)
        return stored

    return one_chunk


def run_one(args, out: Path) -> None:
    """Child process: build the model, time one method over every chunk, save chunk 0."""
    config = tinyllama_config(args.smoke)
    sizes = Sizes.of(config, window_size=64, num_windows=4, num_queries=16)
    layers = [int(x) for x in args.layers.split(",")]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=DTYPES[args.dtype]).eval()
    chunks = torch.randint(0, config.vocab_size, (args.chunks, sizes.chunk_tokens)).to(device)
    if args.run_one.startswith("project_"):
        model.requires_grad_(False)
        space, batch_size = args.run_one.removeprefix("project_"), args.batch_size

        def step(batch):
            return trajectory_batch(model, batch, layers, sizes, space)[0]
    else:
        one_chunk = (
            transformer_lens_method(model, layers, sizes)
            if args.run_one == "transformer_lens"
            else lambda chunk: baseline_chunk(model, chunk, layers, sizes)
        )
        batch_size = 1

        def step(batch):
            return one_chunk(batch[0])

    floor = model_memory_gb(device)
    reset_peak_memory(device)
    first = step(chunks[:1])  # warm-up (allocator, kernels), kept for the force check
    before = matmul_rate(DTYPES[args.dtype], args.device)  # the machine's rate beside it
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(chunks), batch_size):
        step(chunks[i : i + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    after = matmul_rate(DTYPES[args.dtype], args.device)
    save_file({k: v[:1].float().contiguous().cpu() for k, v in first.items()}, out / "first.st")
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "model_gb": floor}
    result["matmul_flops_per_s"] = (before + after) / 2
    result |= memory_gb(device)
    (out / "result.json").write_text(json.dumps(result))


def reference_tensors(project_hidden: dict, project_kv: dict) -> dict:
    """The project's chunk-0 tensors under the names the peers store: kv space as is, and
    the hidden space's dL/d(q_proj output) as `force_q_proj`."""
    renamed = {
        key.replace("force_queries", "force_q_proj"): value
        for key, value in project_hidden.items()
        if key.endswith(("force_hidden", "force_queries"))
    }
    return project_kv | renamed


def agreement(tensors: dict, reference: dict) -> dict[str, float]:
    """Per stored name, the max over layers of ||method - project|| / ||project||."""
    worst: dict[str, float] = {}
    for key, value in tensors.items():
        theirs = reference[key].flatten()
        rel = ((value.flatten() - theirs).norm() / theirs.norm()).item()
        name = key.split(".", 1)[1]
        worst[name] = max(worst.get(name, 0.0), rel)
    return worst


def available(methods: list[str]) -> tuple[list[str], dict[str, str]]:
    skipped = {}
    for method in methods:
        module = PEERS.get(method)
        if module and importlib.util.find_spec(module) is None:
            skipped[method] = f"{module} is not installed (pip install -e '.[bench]')"
            print(f"skipping {method}: {skipped[method]}")
    return [m for m in methods if m not in skipped], skipped


def benchmark(args) -> dict:
    methods, skipped = available(args.methods.split(","))
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    firsts = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.repeats):
            shift = round_index % len(methods)
            for method in methods[shift:] + methods[:shift]:
                out = Path(scratch) / f"{method}_{round_index}"
                run = run_child("bench.bench_trajectories", child_args(args, method), out)
                if "error" not in run and method not in firsts:
                    firsts[method] = load_file(out / "first.st")
                runs[method].append(run)
                print(f"round {round_index} {method}: {json.dumps(run)}", flush=True)
    return summarize(args, runs, skipped, firsts)


def summarize(args, runs, skipped, firsts) -> dict:
    rates = [
        run["matmul_flops_per_s"] for done in runs.values() for run in done if "error" not in run
    ]
    config = tinyllama_config(args.smoke)
    sizes = Sizes.of(config, window_size=64, num_windows=4, num_queries=16)
    methods: dict[str, dict] = {name: {"skipped": why} for name, why in skipped.items()}
    for name, done in runs.items():
        errors = [run["error"] for run in done if "error" in run]
        if errors:
            methods[name] = {"failed": errors[0]}
            continue
        per_round = [args.chunks / run["seconds"] for run in done]
        methods[name] = {
            "chunks_per_s": sum(per_round) / len(per_round),
            "chunks_per_s_per_round": per_round,
            "cpu_seconds_per_round": [run["cpu_seconds"] for run in done],
            "peak_gb": max(run["peak_gb"] for run in done),
            "model_gb": done[0]["model_gb"],
            "memory_measure": done[0]["measure"],
        }
        if name.startswith("project_"):
            space = name.removeprefix("project_")
            methods[name]["bytes_per_window_per_layer_bf16"] = bytes_per_window(sizes, space, 2)
    if "project_hidden" in firsts and "project_kv" in firsts:
        reference = reference_tensors(firsts["project_hidden"], firsts["project_kv"])
        for name in ("baseline", "transformer_lens"):
            if name in firsts and "chunks_per_s" in methods.get(name, {}):
                methods[name]["max_rel_diff_vs_project"] = agreement(firsts[name], reference)
    fastest_project = max(
        (methods[m]["chunks_per_s"] for m in ("project_hidden", "project_kv")
         if "chunks_per_s" in methods.get(m, {})),
        default=None,
    )  # fmt: skip
    for method in methods.values():
        if fastest_project and "chunks_per_s" in method:
            method["fastest_project_speedup"] = fastest_project / method["chunks_per_s"]
    return {
        "benchmark": "trajectories",
        "chunks": args.chunks,
        "layers": [int(x) for x in args.layers.split(",")],
        "dtype": args.dtype,
        "device": args.device,
        "smoke": args.smoke,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": describe(args.device),
        "matmul_gflop_per_s": sum(rates) / len(rates) / 1e9 if rates else None,
        "matmul_gflop_per_s_range": [min(rates) / 1e9, max(rates) / 1e9] if rates else None,
        "methods": methods,
    }


def child_args(args, method: str) -> list[str]:
    return [
        "--run-one", method, "--dtype", args.dtype, "--chunks", str(args.chunks),
        "--device", args.device, "--batch-size", str(args.batch_size), "--layers", args.layers,
        *(["--smoke"] if args.smoke else []),
    ]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--layers", default="0,11,21")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--smoke", action="store_true", help="a 16x narrower model: checks the script, not speed"
    )
    parser.add_argument("--run-one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.run_one:
        run_one(args, args.out)
        return
    results = benchmark(args)
    emit(results, args.json)


if __name__ == "__main__":
    main()
