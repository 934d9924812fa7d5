"""Benchmark rollouts: the transformers engine against vLLM on one model, and vLLM's weight update.

Two comparisons, each measured in this one run, on one random Llama (built locally, no download):

1. rollout tokens/s of the transformers engine (`rollout.engine=hf`) and of vLLM (`rollout.engine=vllm`,
   in process), on the same prompts and sampling (temperature 1, `n` samples each, no early stop:
   every completion runs to `--new-tokens`), best of `--repeats` after one warm-up call;
2. the trainer->vLLM weight update (`update_weights` of every HF tensor: `reload_weights`, the CPU
   re-pack and the prefix-cache reset) next to a memcpy of the same bytes into preallocated tensors;
3. serving an engine guide: a second live vLLM engine (its build time and the resident memory it
   adds, KV cache included) against swapping the guide's weights in and the policy's back into one
   engine at every step (two updates).

    .venv/bin/python tools/bench_rollout.py --preset demo        # examples/tiny_cpu.yaml's policy
    .venv/bin/python tools/bench_rollout.py --preset llama-41m   # 8 layers, hidden 512, vocab 32k
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import psutil
import torch
import transformers

PRESETS = {
    # examples/tiny_cpu.yaml: 4 layers, hidden 128 (head size 32), vocab 128, 40 new tokens
    "demo": dict(hidden=128, layers=4, heads=4, kv_heads=2, ffn=384, vocab=128, new_tokens=40, prompt_len=24),
    "llama-41m": dict(
        hidden=512, layers=8, heads=8, kv_heads=8, ffn=1376, vocab=32000, new_tokens=128, prompt_len=64
    ),
}


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="demo")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    p = PRESETS[args.preset]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from scope_mega.rollout import SamplingParams, make_engine

    config = transformers.LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=p["prompt_len"] + p["new_tokens"] + 8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).eval()
    params = sum(t.numel() for t in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [
        torch.randint(1, p["vocab"], (p["prompt_len"],), generator=gen).tolist() for _ in range(args.prompts)
    ]
    sampling = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=p["new_tokens"], seed=args.seed)
    decode = lambda ids: ""  # noqa: E731 -- no stop strings: the text is never looked at
    tokens = args.prompts * args.n * p["new_tokens"]
    print(
        f"model: Llama {params / 1e6:.1f}M params ({p['layers']} layers, hidden {p['hidden']}, vocab "
        f"{p['vocab']}), fp32, {torch.get_num_threads()} threads; {args.prompts} prompts x n={args.n} x "
        f"{p['new_tokens']} new tokens = {tokens} tokens per call"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = make_engine("hf", tmp, decode=decode, eos_token_ids=[])
        vllm = make_engine("vllm", tmp, decode=decode, eos_token_ids=[])
        rates = {}
        for name, engine in (("transformers", hf), ("vllm", vllm)):
            seconds = _best(lambda e=engine: e.generate(prompts, sampling), args.repeats)
            rates[name] = tokens / seconds
        print(f"\n1. rollout (best of {args.repeats})")
        print(f"   {'engine':<14}{'tokens/s':>12}{'vs transformers':>18}")
        for name, rate in rates.items():
            print(f"   {name:<14}{rate:>12.0f}{rate / rates['transformers']:>17.2f}x")

        weights = [(n, t.detach().clone()) for n, t in model.named_parameters()]
        nbytes = sum(t.numel() * t.element_size() for _, t in weights)
        targets = [torch.empty_like(t) for _, t in weights]

        def memcpy() -> None:
            for out, (_, t) in zip(targets, weights):
                out.copy_(t)

        copy_s = _best(memcpy, args.repeats)
        update_s = _best(lambda: vllm.update_weights(weights), args.repeats)
        print(f"\n2. weight update of {nbytes / 2**20:.1f} MiB (best of {args.repeats})")
        print(f"   {'path':<26}{'seconds':>10}{'GiB/s':>10}{'vs memcpy':>12}")
        for name, seconds in (("memcpy", copy_s), ("vllm update_weights", update_s)):
            print(f"   {name:<26}{seconds:>10.4f}{nbytes / seconds / 2**30:>10.2f}{seconds / copy_s:>11.1f}x")

        gc.collect()
        rss = psutil.Process().memory_info().rss
        start = time.perf_counter()
        guide = make_engine("vllm", tmp, decode=decode, eos_token_ids=[])
        build_s = time.perf_counter() - start
        gc.collect()
        added = psutil.Process().memory_info().rss - rss
        guide.generate(prompts[:1], sampling)  # it serves
        print("\n3. an engine guide")
        print(f"   second engine: built in {build_s:.1f} s once, adds {added / 2**30:.2f} GiB resident")
        print(
            f"   swapping one engine: {2 * update_s:.3f} s every step (guide in, policy back), "
            f"{2 * update_s / (tokens / rates['vllm']):.1%} of this rollout call"
        )


if __name__ == "__main__":
    main()
