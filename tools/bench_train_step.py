"""Benchmark the RL update: tokens/s of one optimizer step (`train_step` with the policy loss) on a
random Llama built locally, and its model FLOP utilisation against a GEMM measured in this same run.

    .venv/bin/python tools/bench_train_step.py --preset demo               # examples/tiny_cpu.yaml's policy
    .venv/bin/python tools/bench_train_step.py --preset demo --packing both  # padded against THD
    .venv/bin/python tools/bench_train_step.py --preset llama-41m
    python tools/bench_train_step.py --preset llama-1b --device cuda       # bf16 on a GPU
    python tools/bench_train_step.py --preset llama-1b --device cuda --precision both  # + TE FP8

Model FLOPs per trained token: 6 N (N = the parameters of every matmul: attention, MLP, output layer)
plus 12 L h s for attention scores and values (the PaLM count, no recomputation; s = the padded
micro-batch length, or in the THD layout the token's own sequence length). The reference is a GEMM
of the model's own shape (micro-batch tokens x hidden times hidden x FFN) in the training dtype (bf16
on CUDA, fp32 on CPU), best of 5: MFU here is the fraction of what this device does on a plain GEMM
of that shape, not of a datasheet peak. FP8
(`--precision fp8|both`: Transformer Engine's FP8 Linears, delayed scaling) is measured against the
same bf16 GEMM, so its MFU above 100% is its speed-up over bf16 matmuls.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from functools import partial

import torch

PRESETS = {
    # examples/tiny_cpu.yaml: 4 layers, hidden 128, vocab 128; prompt ~24 + 40 new tokens
    "demo": dict(
        hidden=128, layers=4, heads=4, kv_heads=2, ffn=384, vocab=128, prompt=24, response=40, budget=1024
    ),
    "llama-41m": dict(
        hidden=512, layers=8, heads=8, kv_heads=8, ffn=1376, vocab=32000, prompt=64, response=128, budget=4096
    ),
    # TinyLlama's shape (1.1 B): a GPU preset
    "llama-1b": dict(
        hidden=2048,
        layers=22,
        heads=32,
        kv_heads=4,
        ffn=5632,
        vocab=32000,
        prompt=256,
        response=768,
        budget=16384,
    ),
}


def _gemm_flops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul, best of 5 after a warm-up."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    best = float("inf")
    for i in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def _measure(args, p: dict, hf: dict, dtype: str, device: torch.device, fp8: bool, thd: bool) -> None:
    """Build the preset's model (Transformer Engine FP8 Linears when `fp8`), time its update on
    micro-batches in the padded or THD layout, print."""
    from scope_mega.config import FP8Config, ModelConfig, OptimConfig, ParallelConfig, RunConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.plan import ModelSize
    from scope_mega.rl.batch import Sample, to_micro_batches
    from scope_mega.rl.update import rl_loss
    from scope_mega.train_step import setup_training, train_step

    impl = "te" if fp8 else "local"
    model_cfg = ModelConfig(
        hf_config=hf, transformer_impl=impl, params_dtype=dtype, fp8=FP8Config(enabled=fp8)
    )
    model, spec = build_gpt_model(model_cfg, ParallelConfig(), device)
    state = setup_training(model, spec.vocab_size, OptimConfig(lr=1e-6), ParallelConfig(), args.steps + 1)

    rng = random.Random(0)
    samples = []
    for _ in range(args.sequences):  # response lengths spread over the range, as rollouts are
        n = rng.randint(p["response"] // 4, p["response"])
        response = [rng.randrange(3, p["vocab"]) for _ in range(n)]
        prompt = [rng.randrange(3, p["vocab"]) for _ in range(p["prompt"])]
        samples.append(Sample(prompt, response, [rng.uniform(-1, 1)] * n, [False] * n, [-1.0] * n))
    align = 16 if fp8 else 1  # the trainer's rounding of THD rows for FP8 GEMMs
    micro = to_micro_batches(samples, 1, 0, args.max_tokens or p["budget"], thd=thd, align=align)
    loss = partial(rl_loss, RunConfig().loss)
    tokens = sum(int(b["tokens"]) for b in micro)
    slots = sum(b["input_ids"].numel() for b in micro)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(state, micro, loss, need_entropy=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up
    seconds = min(step() for _ in range(args.steps))

    arch = ModelSize.from_hf(spec.hf_config)
    matmul_params = arch.layers * arch.layer_sharded() + arch.vocab * arch.hidden  # + the output layer
    # query x key positions: every row against its padded length, or every THD segment against itself
    pairs = sum(
        int((b["cu_seqlens"].diff() ** 2).sum()) if thd else b["input_ids"].shape[1] * int(b["tokens"])
        for b in micro
    )
    attention = 12 * arch.layers * arch.hidden * pairs
    flops = 6 * matmul_params * slots + attention  # padded slots are computed too
    longest = max(b["input_ids"].numel() for b in micro)
    gemm = _gemm_flops(longest, arch.hidden, arch.ffn, model.config.params_dtype, device)
    print(
        f"{args.preset} on {device.type} ({dtype}{', TE FP8' if fp8 else ''}, {'THD' if thd else 'padded'}): "
        f"{args.sequences} sequences, "
        f"{tokens} tokens in "
        f"{len(micro)} micro-batches ({1 - tokens / slots:.1%} padding)"
    )
    print(f"update: {seconds:.3f} s per optimizer step = {tokens / seconds:,.0f} tokens/s")
    print(
        f"model FLOP/s {flops / seconds / 1e9:,.1f} G; reference GEMM [{longest} x {arch.hidden}] x "
        f"[{arch.hidden} x {arch.ffn}] {gemm / 1e9:,.1f} G; MFU against it {flops / seconds / gemm:.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="demo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sequences", type=int, default=64, help="sequences per optimizer step")
    parser.add_argument("--max-tokens", type=int, default=None, help="micro-batch token budget (preset's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument(
        "--precision", choices=["default", "fp8", "both"], default="default",
        help="default: bf16 on CUDA, fp32 on CPU; fp8: Transformer Engine FP8 (CUDA); both: each in turn",
    )  # fmt: skip
    parser.add_argument(
        "--packing", choices=["padded", "thd", "both"], default="padded",
        help="micro-batch layout (rl.packing): rows of similar lengths, or THD rows of sequences end to end",
    )  # fmt: skip
    args = parser.parse_args()
    if args.precision != "default" and args.device != "cuda":
        parser.error("--precision fp8/both needs --device cuda (Transformer Engine FP8)")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")

    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    p = PRESETS[args.preset]
    device = init_distributed(device=args.device, seed=0)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    hf = dict(
        model_type="llama",
        hidden_size=p["hidden"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        vocab_size=p["vocab"],
        max_position_embeddings=p["prompt"] + p["response"],
        tie_word_embeddings=False,
    )
    for fp8 in {"default": [False], "fp8": [True], "both": [False, True]}[args.precision]:
        for thd in {"padded": [False], "thd": [True], "both": [False, True]}[args.packing]:
            _measure(args, p, hf, dtype, device, fp8, thd)
    destroy_distributed()


if __name__ == "__main__":
    main()
