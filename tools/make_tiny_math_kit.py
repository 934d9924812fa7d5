"""Build a tiny "math model kit", fully offline, so the math RL pipeline (real-model tokenizer, HF rollout
engine, engine guide, model PRM, Megatron policy and PRM) runs on a CPU in tests and for first tries.

    python tools/make_tiny_math_kit.py --out DIR [--seed N] [--force]

DIR (written in a temp dir beside it, then renamed; an existing DIR is refused unless --force):

    tokenizer/         byte-level BPE (Qwen2's pre-tokenizer, ~512 tokens) trained on the math
                       benchmarks' questions and solutions; specials <|endoftext|> (pad), <|im_start|>,
                       <|im_end|> (eos), <extra_0> (PRM step separator); ChatML chat template
    policy/            random tiny Qwen2ForCausalLM (fp32 safetensors, config, generation_config, tokenizer)
    policy_megatron/   policy/ converted by `scope-mega convert hf-to-megatron` (model/ and hf/), TP=PP=1
    guide/             a second random Qwen2ForCausalLM (seed + 1): a teacher for `scope.guide: engine`
    prm/               random Qwen2ForProcessRewardModel (Qwen2.5-Math-PRM layout, seed + 2) with the
                       tokenizer; its head is shifted so half of GSM8K's solution steps score above 0.5
    prm_megatron/      prm/ converted likewise
    train.jsonl        the first 64 rows of gsm8k.jsonl, as they are
    eval.jsonl         the first 8 rows of amc23.jsonl, as they are

The benchmarks are read from the repository's data/benchmarks (see data/README.md).
The models are untrained: the kit exercises the pipeline, it does not learn math.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from scope_mega.data.benchmarks import BOXED_INSTRUCTION
from scope_mega.weights.files import atomic_output_dir
from scope_mega.weights.mapping import ConversionError

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "data" / "benchmarks"
VOCAB_SIZE = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
# Qwen2's pre-tokenizer split (tokenizer.json): every digit its own piece, words with one leading char.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# head size 32: the smallest vLLM's CPU attention runs, so the kit serves through vLLM too
MODEL_SHAPE = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TRAIN_ROWS, EVAL_ROWS, PRM_CALIBRATION_ROWS = 64, 8, 16
Example = tuple[str, list[str]]  # a question and the steps of its solution


def benchmark_texts(benchmarks: Path) -> list[str]:
    """The tokenizer's training corpus: questions and solutions (string or list-of-string fields) of
    every benchmark file, and once per problem the prompt's own words, which every prompt repeats."""
    texts, rows = [], 0
    for path in sorted(benchmarks.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row, rows = json.loads(line), rows + 1
            for key in ("question", "problem", "solution", "answer"):
                value = row.get(key)
                texts.extend([value] if isinstance(value, str) else value if isinstance(value, list) else [])
    return texts + [f"system\n{BOXED_INSTRUCTION}\nuser\nassistant\n"] * rows


def train_math_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A Qwen2-style byte-level BPE with the ChatML and PRM special tokens, each a single token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<extra_0>"],
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def qwen2_config(tokenizer: transformers.PreTrainedTokenizerFast) -> transformers.Qwen2Config:
    """The tiny Qwen2 shape with the tokenizer's vocabulary and ids (as Qwen2.5-Instruct sets them)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return transformers.Qwen2Config(
        **MODEL_SHAPE, vocab_size=len(tokenizer), bos_token_id=pad, eos_token_id=eos, pad_token_id=pad
    )


def write_causal_lm(path: Path, tokenizer: transformers.PreTrainedTokenizerFast, seed: int) -> None:
    """A Qwen2ForCausalLM with transformers' own random initialisation, saved with its tokenizer."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(qwen2_config(tokenizer)).eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_prm(
    path: Path, tokenizer: transformers.PreTrainedTokenizerFast, seed: int, examples: list[Example]
) -> None:
    """A Qwen2ForProcessRewardModel with every tensor drawn around 0 (norms around 1), then its class-1
    bias shifted so that half the steps of `examples` (question, steps) score above 0.5: a random PRM
    whose scores straddle SCOPE's threshold finds both correct prefixes and first errors."""
    from scope_mega.models.prm import prm_conversation
    from scope_mega.weights.hf_prm import Qwen2ForProcessRewardModel

    model = Qwen2ForProcessRewardModel(qwen2_config(tokenizer)).eval()
    gen = torch.Generator().manual_seed(seed)
    sep = tokenizer.convert_tokens_to_ids("<extra_0>")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
        convs = [
            tokenizer.encode(prm_conversation(tokenizer, q, steps), verbose=False) for q, steps in examples
        ]
        convs = [c for c in convs if len(c) <= MODEL_SHAPE["max_position_embeddings"]]
        width = max(map(len, convs))  # right padding: causal attention keeps it out of the real tokens
        ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in convs])
        logits = model(ids)[ids == sep]
        model.score[2].bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def convert_to_megatron(pairs: list[tuple[Path, Path]]) -> None:
    """`scope-mega convert hf-to-megatron --tp 1 --pp 1` for each (HF dir, out) pair, all at once."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "scope_mega.cli", "convert", "hf-to-megatron"]
            + ["--hf-dir", str(hf_dir), "--out", str(out), "--tp", "1", "--pp", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for hf_dir, out in pairs
    ]
    failed = []
    for (hf_dir, _), proc in zip(pairs, procs):
        output = proc.communicate()[0]
        if proc.returncode:
            failed.append(f"converting {hf_dir} failed ({proc.returncode}):\n{output}")
    if failed:
        raise RuntimeError("\n".join(failed))


def gsm8k_examples(path: Path, rows: int) -> list[Example]:
    """(question, solution lines) of the first `rows` GSM8K problems: steps for the PRM's calibration."""
    with path.open(encoding="utf-8") as f:
        data = [json.loads(line) for _, line in zip(range(rows), f)]
    return [(row["question"], row["answer"].split("\n")) for row in data]


def copy_rows(src: Path, dst: Path, rows: int) -> None:
    """The first `rows` lines of a JSON Lines file, byte for byte."""
    with src.open("rb") as f:
        dst.write_bytes(b"".join(line for _, line in zip(range(rows), f)))


def build_kit(out: Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Write the kit (see the module docstring) to `out`; return its parts' paths by name."""
    out = Path(out)
    names = ["tokenizer", "policy", "policy_megatron", "guide", "prm", "prm_megatron"]
    with atomic_output_dir(out, force) as tmp:
        tokenizer = train_math_tokenizer(benchmark_texts(BENCHMARKS))
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_causal_lm(tmp / "policy", tokenizer, seed)
        write_causal_lm(tmp / "guide", tokenizer, seed + 1)
        examples = gsm8k_examples(BENCHMARKS / "gsm8k.jsonl", PRM_CALIBRATION_ROWS)
        write_prm(tmp / "prm", tokenizer, seed + 2, examples)
        convert_to_megatron([(tmp / "policy", tmp / "policy_megatron"), (tmp / "prm", tmp / "prm_megatron")])
        copy_rows(BENCHMARKS / "gsm8k.jsonl", tmp / "train.jsonl", TRAIN_ROWS)
        copy_rows(BENCHMARKS / "amc23.jsonl", tmp / "eval.jsonl", EVAL_ROWS)
    return {**{name: out / name for name in names}, "train": out / "train.jsonl", "eval": out / "eval.jsonl"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="kit directory to create")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random models")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    try:
        paths = build_kit(args.out, args.seed, args.force)
    except (ConversionError, FileNotFoundError) as e:
        parser.exit(2, f"make_tiny_math_kit: {e}\n")
    print(f"wrote {args.out}: {', '.join(paths)}")


if __name__ == "__main__":
    main()
