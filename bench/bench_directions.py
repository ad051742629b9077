"""Benchmark `directions` against the tools a user would pick instead, side by side in one run.

Model: Qwen3-0.6B's architecture (hidden 1024, 28 layers, 16 heads, 8 KV heads,
head_dim 128, MLP 3072, vocab 151,936, tied embeddings) with random, seeded
weights: the real model's FLOPs and bytes without the hub. Prompts: the first N
concepts of the offline word list through params.yaml's templates, tokenized by
the tiny BPE tokenizer (the real Qwen tokenizer needs the hub; prompt lengths are
of the same order). Every method reads hidden_states[layer] at the last real token.

Methods, each written the way its users write it, batches of 64 in input order:
- `baseline`: `Qwen3ForCausalLM` forward with `output_hidden_states=True`
  (every layer and the LM head run), right-padded, `torch.no_grad`.
- `transformer_lens`: `TransformerBridge.boot_transformers(hf_model=...)` (TL 4
  removed `HookedTransformer`; the bridge is its documented replacement) and
  `run_with_cache(names_filter=..., stop_at_layer=layer)`.
- `nnsight`: `TransformersModel` wrapping the same HF model, a trace that
  `.save()`s the layer's output and stops there (`tracer.stop()`), left-padded
  (nnsight's choice for decoders).
- `project`: `pipeline.concepts.concept_vectors.concept_activations` on the
  teacher cut at the layer: length-bucketed batches, each template's shared
  prefix computed once and reused through the KV cache, `torch.inference_mode`.

Each method runs in its own process (`bench/processes.py`), its executed work
recorded by `bench/flops.py`; the methods are interleaved round by round.

    python -m bench.bench_directions --concepts 300 --dtype bfloat16 --repeats 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from bench.flops import matmul_rate, record_work, required_flops
from bench.machine import describe
from bench.processes import emit, memory_gb, model_memory_gb, reset_peak_memory, run_child
from pipeline.common.params import load_params
from pipeline.common.teacher import DTYPES, cut_teacher
from pipeline.concepts.concept_vectors import concept_activations
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.tiny_models import train_tokenizer
from pipeline.inputs.words import build_concepts

ROOT = Path(__file__).resolve().parent.parent
# Peers are optional (`pip install -e '.[bench]'`): method -> the module it needs.
PEERS = {"transformer_lens": "transformer_lens", "nnsight": "nnsight"}
METHODS = ("project", "transformer_lens", "nnsight", "baseline")
# Batches of hidden states at the last real token: prompts -> (B, D).
LastStates = Callable[[list[str]], torch.Tensor]


def qwen3_0_6b_config(smoke: bool = False) -> Qwen3Config:
    """The real architecture; `smoke`: the same depth, 16x narrower (seconds on a CPU)."""
    width = 16 if smoke else 1
    return Qwen3Config(
        vocab_size=151_936 // width,
        hidden_size=1024 // width,
        intermediate_size=3072 // width,
        num_hidden_layers=28,
        num_attention_heads=16 // (4 if smoke else 1),
        num_key_value_heads=8 // (4 if smoke else 1),
        head_dim=128 // (4 if smoke else 1),
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )


def build_model(dtype: torch.dtype, device: str = "cpu", smoke: bool = False):
    torch.manual_seed(0)
    return Qwen3ForCausalLM(qwen3_0_6b_config(smoke)).to(device=device, dtype=dtype).eval()


def concepts(n: int) -> list[str]:
    table, _ = build_concepts(WordlistParams(source="wordfreq", num_concepts=n))
    return table.column("text").to_pylist()


def in_input_order(last_states: LastStates, texts, templates, batch_size) -> torch.Tensor:
    """The user's loop: fixed-size batches in input order, averaged over templates."""
    total = None
    for template in templates:
        rows = []
        for start in range(0, len(texts), batch_size):
            prompts = [template.format(concept=t) for t in texts[start : start + batch_size]]
            rows.append(last_states(prompts).float().cpu())
        acts = torch.cat(rows)
        total = acts if total is None else total + acts
    return total / len(templates)


def baseline(model, tokenizer, layer) -> LastStates:
    tokenizer.padding_side = "right"

    @torch.no_grad()
    def last_states(prompts):
        batch = tokenizer(prompts, padding=True, return_tensors="pt").to(model.device)
        out = model(**batch, output_hidden_states=True)
        last = batch["attention_mask"].sum(1) - 1
        return out.hidden_states[layer][torch.arange(len(prompts)), last]

    return last_states


def transformer_lens(model, tokenizer, layer) -> LastStates:
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer.padding_side = "right"
    bridge = TransformerBridge.boot_transformers(
        "Qwen/Qwen3-0.6B", hf_model=model, tokenizer=tokenizer, device=model.device,
        dtype=model.dtype,
    )  # fmt: skip
    hook = f"blocks.{layer - 1}.hook_resid_post"  # = hidden_states[layer]

    @torch.no_grad()
    def last_states(prompts):
        batch = tokenizer(prompts, padding=True, return_tensors="pt").to(model.device)
        _, cache = bridge.run_with_cache(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            names_filter=hook,
            stop_at_layer=layer,
        )
        last = batch["attention_mask"].sum(1) - 1
        return cache[hook][torch.arange(len(prompts)), last]

    return last_states


def nnsight(model, tokenizer, layer) -> LastStates:
    from nnsight import TransformersModel

    wrapped = TransformersModel(model, task="text-generation", tokenizer=tokenizer)
    target = wrapped.model.layers[layer - 1]  # its output = hidden_states[layer]

    @torch.no_grad()
    def last_states(prompts):
        with wrapped.trace(prompts) as tracer:
            hidden = target.output.save()
            tracer.stop()
        return hidden[:, -1]  # left-padded: the last position is every row's last token

    return last_states


LAST_STATES = {"baseline": baseline, "transformer_lens": transformer_lens, "nnsight": nnsight}


def project(model, tokenizer, layer, dtype: str, batch_size: int, max_length: int):
    teacher = cut_teacher(model.model, tokenizer, (layer,), dtype, str(model.device))

    def run(texts, templates):
        acts = concept_activations(teacher, texts, templates, "last", max_length, batch_size)
        return acts[layer]

    return run


def run_one(args, out: Path) -> None:
    """Child process: build the model, time one method, save its result."""
    params = load_params(ROOT / "params.yaml").directions
    layer, templates = params.deepest_layer, params.templates
    tokenizer, texts = train_tokenizer(), concepts(args.concepts)
    device = torch.device(args.device)
    model = build_model(DTYPES[args.dtype], args.device, args.smoke)
    # Hooked before a peer wraps the layers: a wrapper is called even where it stops early.
    with record_work(model) as work:
        if args.run_one == "project":
            run = project(model, tokenizer, layer, args.dtype, args.batch_size, params.max_length)
        else:
            last_states = LAST_STATES[args.run_one](model, tokenizer, layer)

            def run(texts, templates):
                return in_input_order(last_states, texts, templates, args.batch_size)

        floor = model_memory_gb(device)
        reset_peak_memory(device)
        # The machine's rate beside the method, in its process: the cores are shared.
        before = matmul_rate(DTYPES[args.dtype], args.device)
        work.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        vectors = run(texts, templates)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        after = matmul_rate(DTYPES[args.dtype], args.device)
    save_file({"vectors": vectors[: args.reference_concepts].contiguous()}, out / "vectors.st")
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "matmul_flops_per_s": (before + after) / 2,
        "executed_flops": work.flops(model.config),
        "layer_calls": len(work.layer_calls),
        "lm_head_tokens": work.head_tokens,
        "model_gb": floor,
        **memory_gb(device),
    }
    (out / "result.json").write_text(json.dumps(result))


def relative_error(vectors: torch.Tensor, reference: torch.Tensor) -> float:
    return ((vectors - reference).norm(dim=1) / reference.norm(dim=1)).max().item()


def child_args(args, method: str, dtype: str, concepts: int) -> list[str]:
    return [
        "--run-one", method, "--dtype", dtype, "--concepts", str(concepts),
        "--device", args.device, "--batch-size", str(args.batch_size),
        "--reference-concepts", str(args.reference_concepts),
        *(["--smoke"] if args.smoke else []),
    ]  # fmt: skip


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
    params = load_params(ROOT / "params.yaml").directions
    layer, templates = params.deepest_layer, params.templates
    tokenizer, texts = train_tokenizer(), concepts(args.concepts)
    lengths = [
        len(ids)
        for template in templates
        for ids in tokenizer([template.format(concept=t) for t in texts])["input_ids"]
    ]
    required = required_flops(qwen3_0_6b_config(args.smoke), lengths, layer)
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        reference_run = run_child(
            "bench.bench_directions",
            child_args(args, "baseline", "float32", args.reference_concepts),
            work / "reference",
        )
        if "error" in reference_run:
            raise RuntimeError(f"the fp32 reference failed: {reference_run['error']}")
        reference = load_file(work / "reference" / "vectors.st")["vectors"]
        for round_index in range(args.repeats):
            # Rotate the order each round: no method always runs first or last.
            shift = round_index % len(methods)
            for method in methods[shift:] + methods[:shift]:
                out = work / f"{method}_{round_index}"
                run = run_child(
                    "bench.bench_directions", child_args(args, method, args.dtype, len(texts)), out
                )
                if "error" not in run:
                    vectors = load_file(out / "vectors.st")["vectors"]
                    run["max_rel_error"] = relative_error(vectors, reference)
                runs[method].append(run)
                print(f"round {round_index} {method}: {json.dumps(run)}", flush=True)
    return summarize(args, runs, skipped, required, layer, len(templates))


def summarize(args, runs, skipped, required, layer, templates) -> dict:
    rates = [
        run["matmul_flops_per_s"] for done in runs.values() for run in done if "error" not in run
    ]
    methods: dict[str, dict] = {name: {"skipped": why} for name, why in skipped.items()}
    for name, done in runs.items():
        errors = [run["error"] for run in done if "error" in run]
        if errors:
            methods[name] = {"failed": errors[0]}
            continue
        per_round = [args.concepts / run["seconds"] for run in done]
        seconds = sum(run["seconds"] for run in done) / len(done)
        executed = done[0]["executed_flops"]
        # Per round: executed FLOP/s over the matmul rate measured beside it in that process.
        pct = [100 * executed / run["seconds"] / run["matmul_flops_per_s"] for run in done]
        methods[name] = {
            "concepts_per_s": sum(per_round) / len(per_round),
            "concepts_per_s_per_round": per_round,
            # CPU time (user + sys, all threads): less at the mercy of the other processes.
            "cpu_seconds_per_round": [run["cpu_seconds"] for run in done],
            "max_rel_error_vs_fp32": max(run["max_rel_error"] for run in done),
            "executed_gflop": executed / 1e9,
            "executed_gflop_per_s": executed / seconds / 1e9,
            "executed_pct_of_matmul": sum(pct) / len(pct),
            "executed_pct_of_matmul_per_round": pct,
            "matmul_gflop_per_s_beside": [run["matmul_flops_per_s"] / 1e9 for run in done],
            "required_gflop_per_s": required / seconds / 1e9,
            "layer_calls": done[0]["layer_calls"],
            "lm_head_tokens": done[0]["lm_head_tokens"],
            "peak_gb": max(run["peak_gb"] for run in done),
            "model_gb": done[0]["model_gb"],
            "memory_measure": done[0]["measure"],
        }
    timed = {n: m for n, m in methods.items() if "concepts_per_s" in m}
    if "project" in timed:
        for method in timed.values():
            # Per round, then the spread: the cores are shared, so one ratio is not enough.
            ratios = [
                ours / theirs
                for ours, theirs in zip(
                    timed["project"]["concepts_per_s_per_round"],
                    method["concepts_per_s_per_round"],
                    strict=True,
                )
            ]
            method["project_speedup"] = sum(ratios) / len(ratios)
            method["project_speedup_per_round"] = ratios
            method["project_cpu_time_ratio"] = sum(method["cpu_seconds_per_round"]) / sum(
                timed["project"]["cpu_seconds_per_round"]
            )
    return {
        "benchmark": "directions",
        "concepts": args.concepts,
        "templates": templates,
        "layer": layer,
        "dtype": args.dtype,
        "device": args.device,
        "smoke": args.smoke,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "reference_concepts": args.reference_concepts,
        "machine": describe(args.device),
        "matmul_gflop_per_s": sum(rates) / len(rates) / 1e9 if rates else None,
        "matmul_gflop_per_s_range": [min(rates) / 1e9, max(rates) / 1e9] if rates else None,
        "required_gflop": required / 1e9,
        "methods": methods,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=300)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--reference-concepts",
        type=int,
        default=100,
        help="concepts checked against the fp32 reference (plain transformers in fp32)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
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
