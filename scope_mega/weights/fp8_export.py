"""FP8 export of a trained policy: a Megatron checkpoint -> an HF directory in modelopt's FP8 format,
which vLLM serves on GPU (`quantization_config.quant_method = "modelopt"`, `quant_algo = "FP8"`).

Every Linear of the decoder layers gets float8_e4m3fn weights with a scalar `weight_scale` and a scalar
static `input_scale` beside it; the embedding, the norms and the head stay in the checkpoint's dtype.
Scales come from modelopt's max calibration (`mtq.quantize` with `FP8_DEFAULT_CFG`) on the task's own
training prompts (or on prompts the caller passes). The Linears that vLLM fuses (q/k/v and gate/up, the
mapping's `qkv` and `gate_up` rules) share one weight scale and one input scale, so vLLM never
requantizes them; `share_fused_scales=False` leaves each its own, for tests that check the sharing.

Streams one layer at a time, as `megatron_to_hf` does: the layer's tensors come from the checkpoint
through the one mapping (`mapping.to_hf`) into that layer of a transformers model built on the meta
device, the layer is calibrated on the hidden states the previous layers produced (unquantized, as
`mtq.quantize` calibrates a whole model), and its outputs feed the next layer. Memory: one layer plus
the calibration activations. Calibration runs in fp32, on the GPU where there is one. The directory
appears only when complete.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scope_mega.config import RunConfig, from_dict
from scope_mega.run_dir import LATEST, RL_CHECKPOINTS, SFT_CHECKPOINTS, resolve_checkpoint
from scope_mega.weights import files
from scope_mega.weights.hf_export import write_generation_files
from scope_mega.weights.mapping import Binding, ConversionError, Dims, bindings, is_prm, iter_layers, to_hf
from scope_mega.weights.megatron_ckpt import MegatronCheckpoint
from scope_mega.weights.megatron_to_hf import (
    DEFAULT_MAX_SHARD_BYTES,
    check_megatron_tensors,
    hf_dtype,
    plan_hf_tensors,
    resolve_hf_source,
    write_hf_config,
)

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_SUFFIXES = ("weight_scale", "input_scale")
UNQUANTIZED = ["lm_head", "model.embed_tokens"]  # what modelopt's FP8 config leaves out
DEFAULT_CALIB_PROMPTS = 64


@dataclass(frozen=True)
class Fp8Export:
    """What `export_fp8_checkpoint` wrote, and how far each layer's quantized output is from its
    unquantized output on the calibration prompts (relative L2 error)."""

    out: Path
    source: Path
    calib_prompts: int
    calib_tokens: int
    layer_errors: list[float]


def find_policy_checkpoint(source: str | Path) -> Path:
    """The checkpoint a user names: a run directory means its RL policy (`checkpoints_rl/latest`), else
    its SFT warm-start (`checkpoints/latest`); anything else as `resolve_checkpoint` reads it."""
    source = Path(source)
    for sub in (RL_CHECKPOINTS, SFT_CHECKPOINTS):
        if (source / sub / LATEST).is_file():
            return resolve_checkpoint(source / sub)
    ckpt = resolve_checkpoint(source)
    if not (ckpt / "model").is_dir():
        raise ConversionError(
            f"{source} is neither a run directory (with {RL_CHECKPOINTS}/ or {SFT_CHECKPOINTS}/) nor a "
            "Megatron checkpoint (with model/)"
        )
    return ckpt


def calibration_config(ckpt: Path, config: RunConfig | None) -> RunConfig:
    """The run config whose task calibrates: `config` if given, else the one the trainer recorded in the
    checkpoint, with `run_dir` the checkpoint's own run directory (where the task's tokenizer lives)."""
    if config is not None:
        return config
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        raise ConversionError(
            f"{ckpt} has no trainer_state.json, so the task whose prompts calibrate FP8 is unknown; "
            "pass --config CONFIG.yaml"
        )
    recorded = json.loads(state.read_text()).get("config")
    if not isinstance(recorded, dict):
        raise ConversionError(f"{state} records no run config; pass --config CONFIG.yaml")
    cfg = from_dict(RunConfig, recorded)
    return replace(cfg, run_dir=str(ckpt.parent.parent))


def calibration_prompts(cfg: RunConfig, n: int):
    """The task (tokenizer, prompts) and its first `n` training prompts as [1, T] id tensors. Refuses a
    Countdown run without its tokenizer (building the task would train a new one)."""
    from scope_mega.tasks import build_task

    if cfg.data.task == "countdown":
        model = Path(cfg.run_dir) / "tokenizer" / "tokenizer.model"
        if not model.is_file():
            raise ConversionError(
                f"{model} is missing: calibration encodes the task's prompts with the run's tokenizer; "
                "export from the run directory that trained the policy, or pass --config naming it"
            )
    task = build_task(cfg)
    return task, [torch.tensor([p.ids]) for p in task.train[:n]]


def fp8_plan(plan: list[files.TensorPlan], quantized: set[str]) -> list[files.TensorPlan]:
    """The export's tensors: each quantized weight in e4m3, followed by its two fp32 scalar scales."""
    out = []
    for item in plan:
        if item.name in quantized:
            prefix = item.name.removesuffix("weight")
            out.append(files.TensorPlan(item.name, item.shape, FP8))
            out += [files.TensorPlan(prefix + s, (), torch.float32) for s in SCALE_SUFFIXES]
        else:
            out.append(item)
    return out


def quantization_config() -> dict:
    """`quantization_config` of config.json as modelopt writes it for FP8 (vLLM reads `quant_method`,
    `quant_algo` and `ignore`)."""
    import modelopt

    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    return {
        "config_groups": {"group_0": {"input_activations": fp8, "weights": fp8, "targets": ["Linear"]}},
        "ignore": UNQUANTIZED,
        "quant_algo": "FP8",
        "producer": {"name": "modelopt", "version": modelopt.__version__},
        "quant_method": "modelopt",
    }


def _multiplier(amax: torch.Tensor) -> torch.Tensor:
    """`448 / amax` in fp32, as modelopt's fake quantization computes it (`tensor_quant._fp8_eager`; an
    amax of zero counts as 1)."""
    amax = amax.float().reshape(())
    return E4M3_MAX / torch.where(amax <= 2**-24, torch.ones_like(amax), amax)


def e4m3_scale(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 scalar that dequantizes e4m3 codes of a tensor calibrated to `amax`: `1 / (448 / amax)`,
    modelopt's own dequantizing factor."""
    return 1 / _multiplier(amax)


def e4m3(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` as e4m3 codes and their scale, with modelopt's fake-quant arithmetic (multiply by
    `448 / amax`, clamp, round to e4m3), so `codes.float() * scale` is bitwise its fake-quantized `x`."""
    multiplier = _multiplier(amax)
    return (x.float() * multiplier).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), 1 / multiplier


def _skeleton(hf):
    """The fp32 transformers model of `hf` on the meta device (no memory); layers are materialised one at
    a time. SDPA attention: with no mask it is causal, as the whole model runs it."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            hf, dtype=torch.float32, attn_implementation="sdpa"
        )
    return model.eval()


def _load(module: torch.nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Materialise `module` from the meta device with `tensors`, in fp32 on `device`."""
    module.to_empty(device=device)
    module.load_state_dict(
        {k: t.to(device, torch.float32) for k, t in tensors.items()}, strict=True, assign=True
    )


def _unify_fused_scales(layer: torch.nn.Module, group: list[Binding], layer_prefix: str) -> None:
    """q/k/v and gate/up (the mapping's fused rules) take the largest weight and input amax of their
    group, so each fused group has one weight scale and one input scale."""
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    for b in group:
        if b.rule.kind in ("qkv", "gate_up") and b.hf[0].endswith(".weight"):
            names = [n.removeprefix(layer_prefix).removesuffix(".weight") for n in b.hf]
            preprocess_linear_fusion([layer.get_submodule(n) for n in names])


def _embed(
    model, weight: torch.Tensor, prompts: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list]:
    """The calibration prompts' embeddings (fp32, on `device`), and per prompt what every layer takes
    besides: position ids, rotary embeddings and the causal mask, made as the transformers model makes
    them."""
    from transformers.masking_utils import create_causal_mask

    hidden = [torch.nn.functional.embedding(ids, weight).to(device, torch.float32) for ids in prompts]
    rotary = type(model.model.rotary_emb)(config=model.config).to(device)  # off the meta device
    position = []
    for h in hidden:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(
            config=model.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos
        )
        position.append((pos, rotary(h, position_ids=pos), mask))
    return hidden, position


def _run(layer: torch.nn.Module, hidden: list[torch.Tensor], position: list) -> list[torch.Tensor]:
    """`layer` on each prompt's hidden states (`position`: its position ids, rotary embeddings, mask)."""
    return [
        layer(h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
        for h, (pos, emb, mask) in zip(hidden, position)
    ]


def _calibrate_layer(
    layer: torch.nn.Module,
    group: list[Binding],
    prefix: str,
    hidden: list[torch.Tensor],
    position: list,
    share_fused_scales: bool,
) -> list[torch.Tensor]:
    """Quantize `layer` in place with max calibration on `hidden` (one [1, T, H] tensor per prompt), fused
    groups unified if `share_fused_scales`. Returns the layer's unquantized outputs: the next layer's
    inputs."""
    import modelopt.torch.quantization as mtq

    outputs: list[torch.Tensor] = []
    with contextlib.redirect_stdout(io.StringIO()):  # modelopt prints a line per call
        mtq.quantize(layer, mtq.FP8_DEFAULT_CFG, lambda m: outputs.extend(_run(m, hidden, position)))
    if share_fused_scales:
        _unify_fused_scales(layer, group, prefix)
    return outputs


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Relative L2 distance of `got` from `want` over all prompts."""
    num = sum(float((g - w).square().sum()) for g, w in zip(got, want))
    return (num / max(sum(float(w.square().sum()) for w in want), 1e-30)) ** 0.5


@torch.no_grad()
def export_fp8_checkpoint(
    source: str | Path,
    out: str | Path,
    force: bool = False,
    config: RunConfig | None = None,
    calib_prompts: int = DEFAULT_CALIB_PROMPTS,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    prompts: list[torch.Tensor] | None = None,
    share_fused_scales: bool = True,
) -> Fp8Export:
    """Write `out`: the policy of `source` (a run directory or a checkpoint) with FP8 Linear weights,
    its config with modelopt's `quantization_config`, `hf_quant_config.json`, the task's tokenizer
    and a generation config. Every input is checked before anything is written.

    `prompts` ([1, T] token-id tensors) calibrate in place of the task's first `calib_prompts` training
    prompts. `share_fused_scales=False` skips giving each fused group one scale (an export vLLM would
    requantize: only for checking that the sharing happens)."""
    ckpt_dir = find_policy_checkpoint(source)
    hf, _ = resolve_hf_source(ckpt_dir)
    if is_prm(hf):
        raise ConversionError(f"{ckpt_dir} holds a process reward model; export-fp8 exports a policy")
    items = [b for b in bindings(hf) if b.rule.export]  # fails for an architecture the mapping lacks
    ckpt = MegatronCheckpoint(ckpt_dir / "model")
    check_megatron_tensors(ckpt, items, hf)
    cfg = calibration_config(ckpt_dir, config)
    task, task_prompts = calibration_prompts(cfg, calib_prompts)
    prompts = task_prompts if prompts is None else prompts
    if not prompts:
        raise ConversionError(f"the task of {ckpt_dir} has no training prompts to calibrate with")
    top = max(int(ids.max()) for ids in prompts)
    if top >= hf.vocab_size:
        raise ConversionError(
            f"the calibration tokenizer gives token id {top} but the model's vocab_size is {hf.vocab_size}; "
            "calibrate with the tokenizer the policy was trained with"
        )
    dims, dtype = Dims.of(hf), hf_dtype(hf)
    plan = plan_hf_tensors(ckpt, items, dims, dtype)
    dtype = dtype or plan[0].dtype
    model = _skeleton(hf)  # calibrates in fp32: exact for bf16 weights, and fast on CPUs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantized = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")
    }
    hidden: list[torch.Tensor] = []
    position: list[tuple] = []
    errors: list[float] = []

    with files.atomic_output_dir(out, force) as tmp:
        writer = files.SafetensorsShardWriter(tmp, fp8_plan(plan, quantized), max_shard_bytes)
        for group in iter_layers(items):
            loaded = ckpt.read([b.megatron for b in group])
            tensors = {
                name: t.to(dtype)
                for b in group
                for name, t in zip(b.hf, to_hf(b.rule, loaded.pop(b.megatron), dims))
            }
            layer_index = group[0].layer
            if layer_index is None:
                for name, t in tensors.items():
                    if name == "model.embed_tokens.weight":
                        hidden, position = _embed(model, t, prompts, device)
                    writer.write(name, t)
                continue
            prefix = f"model.layers.{layer_index}."
            layer = model.model.layers[layer_index]
            _load(layer, {n.removeprefix(prefix): t for n, t in tensors.items()}, device)
            order = list(tensors)
            for name in tensors.keys() & quantized:
                del tensors[name]  # the layer holds it now, in fp32
            outputs = _calibrate_layer(layer, group, prefix, hidden, position, share_fused_scales)
            exported = {}  # HF weight name -> (e4m3 codes, weight scale, input scale)
            for name in order:
                if name in quantized:
                    linear = layer.get_submodule(name.removeprefix(prefix).removesuffix(".weight"))
                    codes, scale = e4m3(linear.weight, linear.weight_quantizer.amax)
                    exported[name] = (codes.cpu(), scale.cpu(), e4m3_scale(linear.input_quantizer.amax).cpu())
                    # bitwise its fake-quantized weight, so the error pass need not quantize it per prompt
                    linear.weight.data = codes.float() * scale
                    linear.weight_quantizer.disable()
            errors.append(_relative_error(_run(layer, hidden, position), outputs))
            hidden = outputs
            for name in order:
                if name not in exported:
                    writer.write(name, tensors.pop(name))
                    continue
                for suffix, value in zip(("weight", *SCALE_SUFFIXES), exported.pop(name)):
                    writer.write(name.removesuffix("weight") + suffix, value)
            model.model.layers[layer_index] = torch.nn.Identity()
            del layer
            gc.collect()  # modelopt's quantized modules sit in reference cycles: free this layer now
        writer.close()
        write_hf_config(hf, tmp, dtype)
        config_json = json.loads((tmp / "config.json").read_text())
        config_json["quantization_config"] = quantization_config()
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        hf_quant = {
            "producer": config_json["quantization_config"]["producer"],
            "quantization": {
                "quant_algo": "FP8",
                "kv_cache_quant_algo": None,
                "exclude_modules": UNQUANTIZED,
            },
        }
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4) + "\n")
        write_generation_files(cfg, hf, task, tmp)
    task.close()
    tokens = sum(p.shape[1] for p in prompts)
    return Fp8Export(Path(out), ckpt_dir, len(prompts), tokens, errors)
