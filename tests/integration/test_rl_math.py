"""End to end: math RL at TP=2 (and PP=2) on CPU with the tiny model kit (tools/make_tiny_math_kit.py).

Exercises what only the math task uses: the HF tokenizer and prompt template, math-verify rewards, the
Megatron PRM served over the model-parallel group while the driver rectifies, a guide engine whose
logprobs feed the clipped off-policy loss, and the KL reference. The models are random, so every
rollout fails; the guide's continuations are kept (`require_correct=false`) and an entropy bonus moves
the weights.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from scope_mega.data.hf_tokenizer import HFTokenizer, load_model_tokenizer
from scope_mega.logging import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]


def _build_kit(out: Path) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("make_tiny_math_kit", REPO / "tools/make_tiny_math_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_kit(out)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return _build_kit(tmp_path_factory.mktemp("math") / "kit")


# vllm: the policy and the guide are two vLLM engines at TP=2 on both ranks, the PRM is Megatron's
ENGINES = {"hf": [], "vllm": ["rollout.engine=vllm", "rollout.vllm_tensor_parallel_size=2"]}
# the trainer's layout: TP=2, and PP=2, where the PRM's forward runs through the pipeline schedule
LAYOUTS = {("hf", "tp2"): 2, ("vllm", "tp2"): 2, ("hf", "pp2"): 1}


@pytest.fixture
def killed_runs_segments():
    """The shared-memory segments a killed vLLM TP=2 run leaves on a CPU machine, under the names vLLM
    0.32 gives every launch; a later run must not trip over them (vllm_engine.py gives each launch
    its own names)."""
    left = [Path(f"/dev/shm/-tp:0-[0-1]-cpushm_{i}") for i in range(2)]
    made = [p for p in left if not p.exists()]
    for p in made:
        p.write_bytes(b"\0" * 4096)
    yield
    for p in made:
        p.unlink(missing_ok=True)


@pytest.mark.parametrize(("engine", "layout"), list(LAYOUTS))
def test_math_rl_with_model_prm_engine_guide_kl_and_clip(kit, engine, layout, tmp_path, killed_runs_segments):
    run = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc-per-node=2",
        "--standalone",
        "-m",
        "scope_mega.cli",
        "train",
        str(REPO / "examples/tiny_math_cpu.yaml"),
        f"run_dir={run}",
        "wandb_mode=disabled",
        f"parallel.tp={LAYOUTS[engine, layout]}",
        f"parallel.pp={3 - LAYOUTS[engine, layout]}",
        "rl.steps=2",
        "loss.entropy_coef=0.01",
        f"model.hf_config={kit['policy_megatron'] / 'hf'}",
        f"data.train_files=[{kit['train']}]",
        f"data.eval_files=[{kit['eval']}]",
        f"data.tokenizer={kit['tokenizer']}",
        f"rl.init_from={kit['policy_megatron']}",
        f"guide.prm_path={kit['prm_megatron']}",
        f"guide.guide_model={kit['guide']}",
        "checkpoint.export_hf=final",
        *ENGINES[engine],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    steps = [m for m in read_metrics(run) if m["stage"] == "rl" and "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    first, second = steps
    assert first["kl"] == 0.0  # the reference holds exactly the starting weights
    assert second["kl"] > 0.0 and first["grad_norm"] > 0.0
    for m in steps:
        assert m["reward"] == 0.0 and m["scope/failed"] == 16.0
        assert m["scope/rejected"] == 0.0
        assert m["scope/salvaged"] == m["scope/selected"] - m["scope/guide_none"]
        assert (m["off_policy_frac"] > 0) == (m["scope/salvaged"] > 0)
        assert "off_clip_frac" in m  # the clipped off-policy loss ran on the guide's logprobs
        assert m["rollout_mismatch"] < 1e-4  # the engine holds the trainer's weights (TP=2 sync)
    assert sum(m["scope/salvaged"] for m in steps) > 0
    assert (run / "checkpoints_rl" / "latest").read_text() == "step_00000002"
    evals = [m for m in read_metrics(run) if "eval/greedy_acc" in m]
    assert [m["step"] for m in evals] == [0, 2]
    state = json.loads((run / "checkpoints_rl" / "step_00000002" / "trainer_state.json").read_text())
    assert (state["tp"], state["pp"]) == (LAYOUTS[engine, layout], 3 - LAYOUTS[engine, layout])
    # the HF export carries the math task's transformers tokenizer and its stop tokens
    _, info = transformers.AutoModelForCausalLM.from_pretrained(
        run / "hf", local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    exported, trained = load_model_tokenizer(run / "hf"), HFTokenizer.from_dir(kit["tokenizer"])
    text = "Janet's ducks lay 16 eggs. \\boxed{18}<|im_end|>"
    assert exported.encode(text) == trained.encode(text) and exported.vocab_size == trained.vocab_size
    gen = transformers.GenerationConfig.from_pretrained(run / "hf")
    assert gen.eos_token_id == trained.stop_token_ids and gen.pad_token_id == trained.pad_id


def test_eval_cli_serves_through_vllm_as_through_transformers(kit, tmp_path):
    """`scope-mega eval --engine vllm` runs and scores as the transformers engine does. The kit's random
    policy extracts no answers, so this checks the plumbing; tests/rollout/test_vllm_engine.py shows
    the greedy tokens themselves equal."""
    results = {}
    for engine in ENGINES:
        out = tmp_path / f"{engine}.json"
        cmd = [
            sys.executable,
            "-m",
            "scope_mega.cli",
            "eval",
            "--model",
            str(kit["policy"]),
            "--engine",
            engine,
        ]
        cmd += [
            "--benchmarks",
            str(REPO / "data/benchmarks/gsm8k.jsonl"),
            "--limit",
            "4",
            "-n",
            "1",
            "-k",
            "1",
        ]
        cmd += ["--temperature", "0", "--max-new-tokens", "24", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[engine] = json.loads(out.read_text())
    assert results["vllm"] == results["hf"]
