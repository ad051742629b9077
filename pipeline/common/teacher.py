"""Load a teacher (hub id or local path) cut at its deepest needed layer.

The loaded module is the base model (no LM head) with its layer list truncated
to the deepest requested layer, so a forward costs layers 1..L only. Indices
follow HF's `hidden_states` convention: 0 is the embedding output, L the output
of layer L; `hidden_states[num_layers]` is after the final norm, so the norm is
kept only when the deepest layer is the last one.

Encoders (BERT-style, e.g. all-MiniLM-L6-v2) load the same way through `AutoModel`:
their blocks sit at `encoder.layer`, `hidden_states[0]` is the embedding output (after
the embedding LayerNorm) and `hidden_states[i]` the output of block i; they have no
final norm to drop.

    teacher = load_teacher("Qwen/Qwen3-0.6B", "main", layers=(14,), dtype="bfloat16")
    acts = teacher.hidden_at(input_ids, attention_mask)  # {14: (B, T, D)}
    teacher_caveat("data/teachers/tiny-qwen3")  # "random-weight teacher: ..." (else "")
    teacher_quantization("data/teachers/smollm2-135m-instruct")  # "Q4_1" (else "")
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import HfHubHTTPError
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.common.devices import resolve_device
from pipeline.common.identity import HUB_PROBE_TIMEOUT_S, looks_like_path

# Where the transformer blocks and the final norm live, across HF families.
_LAYER_PATHS = ("layers", "encoder.layer", "h", "decoder.layers", "transformer.h")
_NORM_PATHS = ("norm", "ln_f", "final_layer_norm", "transformer.ln_f")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


RANDOM_WEIGHTS_KEY = "activation_distillation_random_weights"
"""Key that `pipeline/inputs/tiny_models.py` sets to true in the config.json of every
teacher it builds: the mark of a model whose weights were never trained."""
RANDOM_WEIGHTS_CAVEAT = "random-weight teacher: these numbers test the code, not the method"


def teacher_caveat(model: str | PreTrainedConfig) -> str:
    """What a report's table title must say about its teacher: RANDOM_WEIGHTS_CAVEAT for
    a random-weight teacher (a folder built by `pipeline/inputs/tiny_models.py`, whose
    config.json holds RANDOM_WEIGHTS_KEY: true); for a teacher converted from a quantized
    GGUF (`teacher_quantization`), e.g. "Q4_1 weights dequantized to float32", since its
    numbers are those of the quantized model; "" for a pretrained one as published.

    `model` is a `model` param (a local folder, whose config.json alone is read, or a hub
    id, which is never looked up: hub models are taken as pretrained) or a loaded config
    (`teacher.model.config`, `model.config`). A report module writes e.g.

        caveat = teacher_caveat(params.steering.model)
        title = f"Steering on {params.steering.model}" + (f" ({caveat})" if caveat else "")

    A stage whose report is built from an upstream artifact rather than from a loaded
    model should record the caveat in that artifact's manifest where the model was loaded
    (as `directions` does), so the report does not read model folders it does not list
    as deps.
    """
    if _config_value(model, RANDOM_WEIGHTS_KEY) is True:
        return RANDOM_WEIGHTS_CAVEAT
    quantization = teacher_quantization(model)
    return f"{quantization} weights dequantized to float32" if quantization else ""


QUANTIZATION_KEY = "activation_distillation_quantization"
"""Key that stage `teachers` sets in the config.json of a teacher it converted from a GGUF:
the source quantization (llama.cpp's name, e.g. "Q4_1") of weights stored dequantized."""


def teacher_quantization(model: str | PreTrainedConfig) -> str:
    """The quantization a teacher's weights went through before they were dequantized
    (QUANTIZATION_KEY, e.g. "Q4_1"), "" for one never quantized; `model` as for
    `teacher_caveat`. A report names it beside the teacher: "SmolLM2 (Q4_1 dequantized)"."""
    return str(_config_value(model, QUANTIZATION_KEY) or "")


def _config_value(model: str | PreTrainedConfig, key: str):
    """`key` of a loaded config, or of a local folder's config.json (None for a hub id)."""
    if isinstance(model, PreTrainedConfig):
        return getattr(model, key, None)
    config = Path(model) / "config.json"
    return json.loads(config.read_text()).get(key) if config.is_file() else None


class TeacherLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says how to proceed."""


@dataclass(frozen=True)
class PrefixCache:
    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, kv_heads, P, head_dim) each


@dataclass
class Teacher:
    model: PreTrainedModel  # base model, truncated
    tokenizer: PreTrainedTokenizerBase
    layers: tuple[int, ...]
    num_layers: int  # depth of the full model
    model_id: str
    revision: str | None  # resolved commit where the hub reports one
    blocks_path: str = "layers"  # where the transformer blocks live in `model`

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embedding_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The input-embedding rows (V, E) of `token_ids`, float32 on the CPU."""
        weight = self.model.get_input_embeddings().weight
        return weight.detach()[token_ids.to(weight.device)].float().cpu()

    @property
    def causal(self) -> bool:
        """Decoders attend left to right, so a shared prompt prefix can be cached."""
        return self.blocks_path != "encoder.layer"

    @torch.inference_mode()
    def prefix_cache(self, prefix: list[int]) -> PrefixCache:
        """K/V of a token prefix (batch of one), to be shared by every prompt starting with it."""
        ids = torch.tensor([prefix], device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return PrefixCache(len(prefix), kv)

    @torch.inference_mode()
    def hidden_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixCache | None = None,
    ) -> dict[int, torch.Tensor]:
        """Hidden states (B, T, D) at each requested layer, for the tokens of `input_ids`.

        With `prefix`, the batch continues that cached prefix.
        """
        kwargs = {}
        offset = 0
        if prefix is not None:
            batch = input_ids.shape[0]
            cache = DynamicCache(config=self.model.config)
            for index, (k, v) in enumerate(prefix.kv):
                cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), index)
            kwargs["cache"] = cache
            kwargs["use_cache"] = True
            offset = prefix.length
            ones = attention_mask.new_ones(batch, prefix.length)
            full_mask = torch.cat([ones, attention_mask], dim=1)
        else:
            full_mask = attention_mask
        if self._takes_position_ids:
            # Left padding must not shift positions: count real tokens only.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = positions + offset
        out = self.model(
            input_ids=input_ids, attention_mask=full_mask, output_hidden_states=True, **kwargs
        )
        return {layer: out.hidden_states[layer] for layer in self.layers}

    @property
    def _takes_position_ids(self) -> bool:
        return "position_ids" in inspect.signature(self.model.forward).parameters


def load_teacher(
    model_id: str,
    revision: str | None,
    layers: tuple[int, ...],
    dtype: str = "float32",
    device: str = "cpu",
    layers_key: str = "layers",
    model_key: str = "model",
) -> Teacher:
    """The base model cut after max(`layers`) (see `cut_teacher`), and its tokenizer.

    `model_key` is the params key `model_id` came from, named when its folder is missing.
    """
    model, tokenizer = _load(model_id, revision, DTYPES[dtype], model_key=model_key)
    return cut_teacher(model, tokenizer, layers, dtype, device, model_id, revision, layers_key)


def cut_teacher(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layers: tuple[int, ...],
    dtype: str = "float32",
    device: str = "cpu",
    model_id: str = "",
    revision: str | None = None,
    layers_key: str = "layers",
) -> Teacher:
    """Truncate a loaded base model after its deepest requested layer (in place).

    `layers_key` is the params key `layers` came from, named when a layer is too deep.
    """
    blocks_path, blocks = _blocks(model)
    depth = len(blocks)
    bad = [layer for layer in layers if layer > depth]
    if bad:
        raise ValueError(
            f"{layers_key} holds {bad} but {model_id or type(model).__name__} has "
            f"{depth} layers (valid hidden_states indices: 0..{depth})"
        )
    deepest = max(layers)
    _set(model, blocks_path, nn.ModuleList(list(blocks)[:deepest]))
    if deepest < depth:
        norm_path = next((p for p in _NORM_PATHS if _get(model, p) is not None), None)
        if norm_path is not None:
            _set(model, norm_path, nn.Identity())
    model.config.num_hidden_layers = deepest
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=resolve_device(device), dtype=DTYPES[dtype]).eval()
    resolved = getattr(model.config, "_commit_hash", None) or revision
    return Teacher(model, tokenizer, tuple(layers), depth, model_id, resolved, blocks_path)


def load_causal_lm(
    model_id: str,
    revision: str | None,
    dtype: str = "float32",
    device: str = "cpu",
    model_key: str = "model",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The whole causal LM (with its head), for stages that need logits or LM-loss gradients.

    Same sources and errors as `load_teacher`; parameters are frozen.
    """
    model, tokenizer = _load(model_id, revision, DTYPES[dtype], causal=True, model_key=model_key)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=resolve_device(device), dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    return model, tokenizer


def missing_model_folder(model_id: str, model_key: str) -> FileNotFoundError | None:
    """The error for a `model` param that names a local folder that does not exist."""
    if looks_like_path(model_id) and not Path(model_id).exists():
        return FileNotFoundError(f"model folder not found: {model_id} ({model_key})")
    return None


def pretrained(loader, model_id: str, revision: str | None, **kwargs):
    """`loader.from_pretrained(model_id, revision=revision, **kwargs)` (loader: `AutoModel`,
    `AutoTokenizer` ...), the local copy first.

    A hub id is looked up in the local Hugging Face cache before the network
    (`local_files_only=True`); if it is not there, HF_HUB_OFFLINE fails at once and
    otherwise one probe of the hub (no retries) fails at once when the hub is unreachable,
    instead of the hub client's retries of every file. Raises OSError saying which.
    """
    if looks_like_path(model_id) or Path(model_id).exists():
        return loader.from_pretrained(model_id, revision=revision, **kwargs)
    try:
        return loader.from_pretrained(model_id, revision=revision, local_files_only=True, **kwargs)
    except OSError as err:
        miss = err
    if huggingface_hub.is_offline_mode():
        raise OSError(
            f"{model_id} (revision {revision}) is not in the local Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set."
        ) from miss
    try:
        huggingface_hub.model_info(model_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        pass  # the hub answered (e.g. gated, or no such repo): from_pretrained says what
    except Exception as err:  # the hub client's transport errors (DNS, connect, timeout)
        raise OSError(
            f"{model_id} is not in the local Hugging Face cache and the hub "
            f"({huggingface_hub.constants.ENDPOINT}) is unreachable: {type(err).__name__}: {err}."
        ) from err
    return loader.from_pretrained(model_id, revision=revision, **kwargs)


def _load(
    model_id: str,
    revision: str | None,
    dtype: torch.dtype,
    causal: bool = False,
    model_key: str = "model",
):
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        tokenizer = pretrained(AutoTokenizer, model_id, revision)
        model = pretrained(auto, model_id, revision, dtype=dtype)
    except (OSError, ValueError) as err:
        missing = missing_model_folder(model_id, model_key)
        if missing is not None:
            raise missing from None
        where = "local directory" if Path(model_id).exists() else "Hugging Face hub id"
        raise TeacherLoadError(
            f"cannot load model {model_id!r} (revision {revision!r}, as a {where}): {err} "
            "If the hub is unreachable (offline), point the stage's `model` param "
            "(directions.model, trajectories.model, ...) at a local copy "
            "(a folder with config.json, weights and tokenizer files, e.g. made by "
            "`hf download Qwen/Qwen3-0.6B --local-dir models/qwen3-0.6b`), "
            "or run `make demo` for the offline tiny profile."
        ) from err
    return model, tokenizer


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a model, or of its base model (a causal LM's trunk), in order.

    Found where HF families keep them: `layers` (Llama, Qwen), `h` (GPT-2),
    `encoder.layer` (BERT) ... Block i reads `hidden_states[i]` and writes `hidden_states[i + 1]`.
    """
    return _blocks(getattr(model, "base_model", model))[1]


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(where the blocks live inside `model`, the blocks)."""
    for path in _LAYER_PATHS:
        found = _get(model, path)
        if isinstance(found, nn.ModuleList):
            return path, found
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__} (looked for {_LAYER_PATHS})"
    )


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, leaf, value)
