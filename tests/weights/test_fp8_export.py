"""`scope-mega export-fp8`: a run's policy -> modelopt's HF FP8 format, checked against modelopt quantizing
the same model whole in memory (`mtq.quantize` + its own export-time fusion of shared-input Linears).

The source is a tiny Llama whose weights are bf16 values held in fp32, so "the bf16 weights" are exact
and e4m3's rounding bound (relative 2^-4 in its normal range) applies to them directly.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import countdown_policy_run
from safetensors.torch import load_file

from scope_mega.cli import main
from scope_mega.config import to_dict
from scope_mega.weights.fp8_export import export_fp8_checkpoint
from scope_mega.weights.mapping import ConversionError

CALIB = 16
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
mtq = pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return countdown_policy_run(tmp_path_factory.mktemp("fp8"), CALIB)


def _export(run: dict, out: Path) -> dict[str, torch.Tensor]:
    assert main(["export-fp8", str(run["run"]), "--out", str(out), "--calib-prompts", str(CALIB)]) == 0
    return _tensors(out)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _reference(run: dict) -> torch.nn.Module:
    """modelopt on the whole model in memory: max calibration on the same prompts, then modelopt's fusion
    of the groups vLLM fuses (its own HF export leaves q/k/v with separate weight scales on CPU)."""
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    model = transformers.AutoModelForCausalLM.from_pretrained(run["hf"]).eval()
    with torch.no_grad():
        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: [m(ids) for ids in run["prompts"]])
        for layer in model.model.layers:
            for group in FUSED:
                preprocess_linear_fusion([layer.get_submodule(name) for name in group])
    return model


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    }


def _unshared(tensors: dict[str, torch.Tensor], layers: int) -> list[str]:
    """The fused groups whose members do not carry the very same weight and input scale."""
    bad = []
    for i in range(layers):
        for group in FUSED:
            for scale in ("weight_scale", "input_scale"):
                values = [tensors[f"model.layers.{i}.{m}.{scale}"] for m in group]
                if any(not torch.equal(v, values[0]) for v in values):
                    bad.append(f"layer {i} {group} {scale}")
    return bad


def load_fake_quant(folder: Path) -> torch.nn.Module:
    """The export as a transformers model with modelopt quantizers: dequantized weights, and amax
    (scale x 448) on every weight and input quantizer, so its forward is the fake-quantized one."""
    config = transformers.AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    with torch.no_grad():
        mtq.quantize(model, mtq.FP8_DEFAULT_CFG, None)
        for name, m in _linears(model).items():
            weight_scale = tensors.pop(f"{name}.weight_scale")
            m.weight.copy_(tensors.pop(f"{name}.weight").float() * weight_scale)
            m.weight_quantizer.amax = 448 * weight_scale
            m.input_quantizer.amax = 448 * tensors.pop(f"{name}.input_scale")
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    set_here = {f"{name}.weight" for name in _linears(model)} | {"lm_head.weight"}  # lm_head: tied
    assert not unexpected and not [k for k in missing if k not in set_here and "_quantizer." not in k]
    return model


def test_export_matches_modelopt_in_memory(run: dict):
    out = run["root"] / "fp8"
    got = _export(run, out)
    ref = _reference(run)
    original = load_file(run["hf"] / "model.safetensors")
    linears = _linears(ref)
    assert len(linears) == 14
    for name, m in linears.items():
        weight, scale = got[f"{name}.weight"], got[f"{name}.weight_scale"]
        assert weight.dtype == torch.float8_e4m3fn and scale.shape == () and scale.dtype == torch.float32
        deq = weight.float() * scale
        with torch.no_grad():
            fake = m.weight_quantizer(m.weight)
        assert torch.equal(deq, fake), name  # bitwise: the very values modelopt computes with
        assert torch.equal(scale, 1 / (448 / m.weight_quantizer.amax.float())), name
        assert torch.equal(got[f"{name}.input_scale"], 1 / (448 / m.input_quantizer.amax.float())), name
        bf16 = original[f"{name}.weight"]
        normal = bf16.abs() / scale >= 2**-6  # e4m3's smallest normal, in units of the scale
        assert normal.float().mean() > 0.9
        assert ((deq - bf16).abs() <= 2**-4 * bf16.abs())[normal].all(), name
    for name, tensor in original.items():  # embedding and norms pass through unchanged
        if name not in got or name.removesuffix(".weight") in linears:
            continue
        assert torch.equal(got[name], tensor), name
    assert sorted(n for n in original if n not in got) == []
    assert _unshared(got, 2) == []

    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["quant_algo"]) == ("modelopt", "FP8")
    assert quant["ignore"] == ["lm_head", "model.embed_tokens"]
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "FP8"
    assert (out / "tokenizer.model").is_file() and (out / "generation_config.json").is_file()

    loaded = load_fake_quant(out)
    with torch.no_grad():
        for ids in run["prompts"][:4]:
            torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_shared_scale_check_catches_separate_scales(run: dict):
    """Without the fusion step each of q/k/v keeps its own weight scale (what vLLM would requantize)."""
    out = run["root"] / "fp8_unfused"
    export_fp8_checkpoint(run["run"], out, calib_prompts=CALIB, share_fused_scales=False)
    got = _tensors(out)
    bad = _unshared(got, 2)
    assert bad and all("weight_scale" in b for b in bad)  # inputs are shared anyway: same amax


def _error_line(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("export-fp8 error: "), lines
    return lines[0]


def _nothing_written(out: Path) -> bool:
    return not [p for p in out.parent.iterdir() if p.name.startswith(out.name)]


def test_run_without_its_tokenizer(run: dict, capsys, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(run["run"] / "checkpoints_rl", copy / "checkpoints_rl")
    out = tmp_path / "fp8"
    err = _error_line(capsys, "export-fp8", str(copy), "--out", str(out))
    assert f"{copy / 'tokenizer' / 'tokenizer.model'} is missing" in err
    assert _nothing_written(out)


def test_architecture_the_mapping_does_not_know(run: dict, capsys, tmp_path: Path):
    step = tmp_path / "run" / "checkpoints_rl" / "step_00000001"
    shutil.copytree(run["run"] / "checkpoints_rl" / "step_00000001" / "model", step / "model")
    config = to_dict(run["cfg"])
    config["model"]["hf_config"] = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}
    (step / "trainer_state.json").write_text(json.dumps({"config": config}))
    out = tmp_path / "fp8"
    err = _error_line(capsys, "export-fp8", str(step), "--out", str(out))
    assert "unsupported architecture 'gpt2'" in err
    assert _nothing_written(out)


def test_tokenizer_larger_than_the_model(run: dict, tmp_path: Path):
    """Token ids the embedding does not have are refused before anything is written (not an IndexError)."""
    out = tmp_path / "fp8"
    with pytest.raises(ConversionError) as raised:
        export_fp8_checkpoint(run["run"], out, prompts=[torch.tensor([[1, 10**6]])])
    err = str(raised.value)
    assert "gives token id 1000000 but the model's vocab_size is" in err
    assert _nothing_written(out)
