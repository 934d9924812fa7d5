"""Evaluation on math benchmarks: avg@n and pass@k, from a rollout engine or from saved responses.

Benchmarks (JSON Lines in the formats of the Qwen2.5-Math evaluation suite), saved responses and the
prompt templates are read and rendered by `data.benchmarks`; this module scores and reports.

Two modes:
- engine: `evaluate_engine(engine, encode, problems, sampling, template)` samples `sampling.n`
  responses per problem from any `RolloutEngine` (`make_engine(kind, model_dir)`), then scores them.
- scoring: `load_responses(path)` reads a JSONL with a list of responses per problem (`response` or
  `responses`) next to its reference; `score(...)` judges them with the same verifier.

Metrics per benchmark: avg@n = mean over problems of (correct / n) -- the expected accuracy of one
sample; pass@k = mean over problems of the unbiased estimator 1 - C(n-c, k)/C(n, k)
(`metrics.pass_at_k`), for every k <= n asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scope_mega.data.benchmarks import (
    FORMATS,
    TEMPLATES,
    EvalDataError,
    Problem,
    load_benchmark,
    load_responses,
    render_prompt,
)
from scope_mega.metrics import pass_at_k
from scope_mega.rewards.base import Verifier

# ----------------------------------------------------------------------------- scoring


@dataclass
class BenchmarkResult:
    name: str
    problems: int
    n: int  # samples per problem (the smallest, when they differ)
    correct: int  # correct responses in total
    responses: int  # responses in total
    avg: float  # avg@n
    pass_at: dict[int, float]  # k -> pass@k
    per_problem: list[dict[str, Any]] = field(default_factory=list)


def score(
    problems: Sequence[Problem], verifier: Verifier, ks: Sequence[int] = (1,), name: str | None = None
) -> BenchmarkResult:
    """Judge every problem's `responses` against its answer; avg@n and pass@k for k <= n."""
    if not problems:
        raise EvalDataError("nothing to score")
    flat = [(i, r) for i, p in enumerate(problems) for r in p.responses]
    verdicts = verifier.verify_batch([r for _, r in flat], [problems[i].answer for i, _ in flat])
    per: list[list] = [[] for _ in problems]
    for (i, _), v in zip(flat, verdicts):
        per[i].append(v)
    n_min = min(len(p.responses) for p in problems)
    if n_min == 0:
        raise EvalDataError("a problem has no responses")
    per_problem, avgs = [], []
    passes: dict[int, list[float]] = {k: [] for k in ks if k <= n_min}
    for p, vs in zip(problems, per):
        c = sum(v.correct for v in vs)
        avgs.append(c / len(vs))
        for k in passes:
            passes[k].append(pass_at_k(len(vs), c, k))
        per_problem.append(
            {
                "index": p.index,
                "answer": p.answer,
                "correct": [v.correct for v in vs],
                "extracted": [v.extracted for v in vs],
            }
        )
    return BenchmarkResult(
        name=name or problems[0].source,
        problems=len(problems),
        n=n_min,
        correct=sum(sum(pp["correct"]) for pp in per_problem),
        responses=len(flat),
        avg=sum(avgs) / len(avgs),
        pass_at={k: sum(v) / len(v) for k, v in passes.items()},
        per_problem=per_problem,
    )


def evaluate_engine(
    engine,
    encode: Callable[[str], list[int]],
    problems: Sequence[Problem],
    sampling,
    verifier: Verifier,
    template: str = "qwen-boxed",
    ks: Sequence[int] = (1,),
    batch_size: int = 64,
    name: str | None = None,
) -> BenchmarkResult:
    """Sample `sampling.n` responses per problem from `engine` (prompts rendered with `template` and
    tokenised with `encode`), store them on the problems, and score them."""
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [encode(render_prompt(template, p.question)) for p in chunk]
        for p, completions in zip(chunk, engine.generate(prompts, sampling)):
            p.responses = [c.text for c in completions]
    return score(problems, verifier, ks, name)


# ----------------------------------------------------------------------------- output


def format_table(results: Sequence[BenchmarkResult]) -> str:
    """A plain-text table: one row per benchmark, then the macro average over benchmarks."""
    ks = sorted({k for r in results for k in r.pass_at})
    head = ["benchmark", "problems", "n", "avg@n", *[f"pass@{k}" for k in ks]]
    rows = [
        [
            r.name,
            str(r.problems),
            str(r.n),
            f"{100 * r.avg:.1f}",
            *[f"{100 * r.pass_at[k]:.1f}" if k in r.pass_at else "-" for k in ks],
        ]
        for r in results
    ]
    if len(results) > 1:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rows.append(
            [
                "average",
                str(sum(r.problems for r in results)),
                "",
                f"{100 * mean([r.avg for r in results]):.1f}",
                *[
                    f"{100 * mean([r.pass_at[k] for r in results if k in r.pass_at]):.1f}"
                    if any(k in r.pass_at for r in results)
                    else "-"
                    for k in ks
                ],
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def results_json(results: Sequence[BenchmarkResult], per_problem: bool = True) -> dict[str, Any]:
    out = {}
    for r in results:
        d = asdict(r)
        d["pass_at"] = {f"pass@{k}": v for k, v in r.pass_at.items()}
        d["avg@n"] = d.pop("avg")
        if not per_problem:
            d.pop("per_problem")
        out[r.name] = d
    if results:
        out["average"] = {
            "avg@n": sum(r.avg for r in results) / len(results),
            "problems": sum(r.problems for r in results),
        }
    return out


# ----------------------------------------------------------------------------- command line


def load_encoder(model_dir: str | Path) -> Callable[[str], list[int]]:
    """`encode(text)` for the tokenizer stored with a model (no special tokens added: the template
    writes them)."""
    from scope_mega.data.hf_tokenizer import load_model_tokenizer

    return load_model_tokenizer(model_dir).encode


def _engine_kwargs(args, benchmarks: list[list[Problem]], encode: Callable[[str], list[int]]) -> dict:
    """vLLM's KV cache on CPU (`VLLMEngine`'s `kv_cache_tokens`): one engine call's sequences at once,
    `--batch-size` prompts x `-n` samples, each the longest prompt plus `--max-new-tokens`."""
    if args.engine != "vllm":
        return {}
    import transformers

    from scope_mega.plan import vllm_cpu_kv_tokens

    hf = transformers.AutoConfig.from_pretrained(args.model, local_files_only=True)
    positions = hf.max_position_embeddings
    longest = max(len(encode(render_prompt(args.template, p.question))) for ps in benchmarks for p in ps)
    prompts = min(args.batch_size, max(len(ps) for ps in benchmarks))
    seq = min(positions, longest + args.max_new_tokens)
    return {"kv_cache_tokens": vllm_cpu_kv_tokens(prompts * args.n, seq, positions)}


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="avg@n / pass@k on math benchmarks (engine or saved responses)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory served by the rollout engine")
    src.add_argument("--responses", nargs="+", help="JSONL files with saved responses per problem (scoring)")
    p.add_argument("--benchmarks", nargs="*", default=[], help="benchmark JSONL files (with --model)")
    p.add_argument("--format", default=None, choices=list(FORMATS), help="field format (default: detect)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument(
        "--template", default="qwen-boxed", help=f"{', '.join(TEMPLATES)} or a '{{question}}' string"
    )
    p.add_argument("-n", "--n", type=int, default=8, help="samples per problem")
    p.add_argument("-k", "--k", type=int, nargs="+", default=[1, 8], help="pass@k values (k <= n)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per engine call")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.set_defaults(func=run_eval_cli)


def run_eval_cli(args) -> int:
    """`scope-mega eval`: 0 with the table printed (and `--out` written), 2 with one `eval error:`
    line for input it cannot score (`EvalDataError`). Every input file is read before any model
    loads."""
    import sys

    from scope_mega.rewards.math_verifier import MathVerifier

    results = []
    try:
        if args.responses:
            scored = [load_responses(path, args.format)[: args.limit] for path in args.responses]
        else:
            if not args.benchmarks:
                raise EvalDataError("--model needs --benchmarks FILE...")
            benchmarks = [load_benchmark(path, args.format, args.limit) for path in args.benchmarks]
            if not Path(args.model, "config.json").is_file():
                raise EvalDataError(f"{args.model}: not a model directory (no config.json)")
        with MathVerifier() as verifier:
            if args.responses:
                results = [score(problems, verifier, args.k) for problems in scored]
            else:
                from scope_mega.rollout.engine import SamplingParams
                from scope_mega.rollout.factory import make_engine

                encode = load_encoder(args.model)
                engine = make_engine(args.engine, args.model, **_engine_kwargs(args, benchmarks, encode))
                sampling = SamplingParams(
                    n=args.n,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens,
                    seed=args.seed,
                )
                results = [
                    evaluate_engine(
                        engine, encode, problems, sampling, verifier, args.template, args.k, args.batch_size
                    )
                    for problems in benchmarks
                ]
    except EvalDataError as e:
        print(f"eval error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results_json(results), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


__all__ = [
    "BenchmarkResult",
    "evaluate_engine",
    "format_table",
    "results_json",
    "score",
]
