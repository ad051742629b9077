"""Benchmark `directions` against the plain transformers way, side by side in one run.

Model: Qwen3-0.6B's architecture (hidden 1024, 28 layers, 16 heads, 8 KV heads,
head_dim 128, MLP 3072, vocab 151,936, tied embeddings) with random, seeded
weights: the real model's FLOPs and bytes without the hub. Prompts: the first N
concepts of the offline word list through params.yaml's templates, tokenized by
the tiny BPE tokenizer (the real Qwen tokenizer needs the hub; prompt lengths are
of the same order).

Baseline, written the way a user would: `Qwen3ForCausalLM` (what
AutoModelForCausalLM returns) forward with `output_hidden_states=True`, batches in
input order, right-padded to the longest, fixed batch size, `torch.no_grad`.
Project: `pipeline.extract.concept_activations` on the teacher cut at the layer.

    python bench/bench_directions.py --concepts 2000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from pipeline.common.params import load_params
from pipeline.common.teacher import DTYPES, cut_teacher
from pipeline.concepts.concept_vectors import concept_activations
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.tiny_models import train_tokenizer
from pipeline.inputs.words import build_concepts

ROOT = Path(__file__).resolve().parent.parent


def qwen3_0_6b_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )


def build_model(dtype: torch.dtype) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(qwen3_0_6b_config()).to(dtype).eval()


def concepts(n: int) -> list[str]:
    table, _ = build_concepts(WordlistParams(source="wordfreq", num_concepts=n))
    return table.column("text").to_pylist()


def baseline(model, tokenizer, texts, templates, layer, batch_size) -> torch.Tensor:
    """The plain way: full model, every hidden state, input order, pad to longest."""
    tokenizer.padding_side = "right"
    total = torch.zeros(len(texts), model.config.hidden_size)
    with torch.no_grad():
        for template in templates:
            for start in range(0, len(texts), batch_size):
                prompts = [template.format(concept=t) for t in texts[start : start + batch_size]]
                batch = tokenizer(prompts, padding=True, return_tensors="pt")
                out = model(**batch, output_hidden_states=True)
                last = batch["attention_mask"].sum(1) - 1
                hidden = out.hidden_states[layer][torch.arange(len(prompts)), last]
                total[start : start + len(prompts)] += hidden.float()
    return total / len(templates)


def required_flops(tokenizer, texts, templates, config: Qwen3Config, layer: int) -> float:
    """FLOPs of the work that is needed: every real token through layers 1..L, no LM head."""
    hidden, heads, kv, head_dim = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    weights = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * config.intermediate_size
    flops = 0.0
    for template in templates:
        for ids in tokenizer([template.format(concept=t) for t in texts])["input_ids"]:
            length = len(ids)
            # 2 FLOPs per multiply-add; attention scores and mixing over the causal context.
            flops += layer * (
                2 * weights * length + 2 * 2 * heads * head_dim * length * (length + 1) / 2
            )
    return flops


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=2000)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--reference-concepts",
        type=int,
        default=200,
        help="concepts checked against the fp32 reference",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml").directions
    layer, templates = params.deepest_layer, params.templates
    torch.set_num_threads(torch.get_num_threads())
    tokenizer = train_tokenizer()
    texts = concepts(args.concepts)
    dtype = DTYPES[args.dtype]

    model = build_model(dtype)
    start = time.perf_counter()
    base_vectors = baseline(model, tokenizer, texts, templates, layer, args.batch_size)
    base_s = time.perf_counter() - start
    teacher = cut_teacher(model.model, tokenizer, (layer,), args.dtype)
    start = time.perf_counter()
    ours = concept_activations(
        teacher, texts, templates, "last", params.max_length, args.batch_size
    )
    ours_s = time.perf_counter() - start
    del model, teacher

    reference_model = build_model(torch.float32)
    subset = texts[: args.reference_concepts]
    reference = baseline(reference_model, tokenizer, subset, templates, layer, args.batch_size)
    mine = ours[layer][: len(subset)]
    rel = ((mine - reference).norm(dim=1) / reference.norm(dim=1)).max().item()
    agreement = (base_vectors[: len(subset)] - reference).norm(dim=1) / reference.norm(dim=1)

    flops = required_flops(tokenizer, texts, templates, qwen3_0_6b_config(), layer)
    results = {
        "concepts": len(texts),
        "templates": len(templates),
        "layer": layer,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "baseline_concepts_per_s": len(texts) / base_s,
        "project_concepts_per_s": len(texts) / ours_s,
        "speedup": base_s / ours_s,
        "project_max_rel_error_vs_fp32": rel,
        "baseline_max_rel_error_vs_fp32": agreement.max().item(),
        "required_gflop": flops / 1e9,
        "project_gflop_per_s": flops / ours_s / 1e9,
        "baseline_gflop_per_s_of_required": flops / base_s / 1e9,
        "matmul_gflop_per_s": matmul_rate(dtype) / 1e9,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
