"""The dry-run plan as text: `format_plan` (layout, per-GPU memory of each role, the phase table) for
`scope-mega train CONFIG --dry-run`. The numbers and their formulas are `plan`'s; this module only
lays them out.
"""

from __future__ import annotations

from scope_mega.plan import GIB, PHASES, ActivationLayout, Plan


def _gib(n: int | float) -> str:
    return f"{n / GIB:7.2f} GiB"


def _recompute(layout: ActivationLayout) -> str:
    if layout.recompute == "full":
        return f"recompute full, {layout.recompute_method}, {layout.recompute_num_layers} layer(s)"
    if layout.recompute == "selective":
        return f"recompute selective ({', '.join(layout.selective_modules)})"
    return "no recompute"


def format_plan(plan: Plan) -> str:
    t, e = plan.trainer, plan.engine
    lines = [
        f"# plan (target: {plan.target}; world size {plan.world_size}; "
        f"{plan.gpu_memory / GIB:g} GiB per GPU; params {plan.dtype})",
    ]
    if plan.refusal_here:
        lines.append(
            f"# note: validated for {plan.target}; a run on THIS machine would stop: {plan.refusal_here}"
        )
    lines += [
        f"model: {plan.params / 1e9:.3f} B parameters (HF count), padded vocab {plan.padded_vocab}, "
        f"sequence {plan.seq_len} tokens",
        "",
        "layout:",
    ]
    for r in plan.roles:
        if r.tp:
            cp = f"CP={r.cp} " if r.cp > 1 else ""
            dp = "DP=" if "trainer" in r.name else "replicas="
            lines.append(f"  {r.name:34s} TP={r.tp} PP={r.pp} {cp}{dp}{r.dp}  {r.note}")
        else:
            lines.append(f"  {r.name:34s} {r.note}")
    adam_used = "distributed" if t.distributed_optimizer else "replicated"
    lines += [
        "",
        f"policy trainer memory per GPU ({t.params_per_gpu / 1e9:.3f} B params on the heaviest stage):",
        f"  weights                 {_gib(t.weights)}",
        f"  grads (fp32)            {_gib(t.grads)}",
        f"  Adam states             {_gib(t.adam)} replicated / {_gib(t.adam_distributed)} distributed"
        f" (using {adam_used})",
        f"  FP8 weight copies       {_gib(t.fp8_weights)}",
        f"  activations (rough)     {_gib(t.activations)} ({t.micro_batches_in_flight} micro batch(es) in "
        f"flight x {t.tokens_per_micro_batch} tokens per GPU; {_recompute(t.layout)}; "
        f"logits {_gib(t.logits).strip()})",
        f"  total                   {_gib(t.total)}",
        "",
        f"rollout engine memory per GPU (TP={e.tp}):",
        f"  weights                 {_gib(e.weights)}",
        f"  budget                  {_gib(e.budget)}",
        f"  KV cache                {_gib(e.kv_cache)} = {e.max_tokens} tokens "
        f"({e.kv_bytes_per_token} B/token), {e.max_sequences} full sequences per replica",
    ]
    for name, h in plan.helpers.items():
        budget = f", budget {_gib(h.budget).strip()}" if h.budget else ""
        size = f"weights per GPU {_gib(h.weights_per_gpu).strip()}{budget}"
        lines.append(f"{name}: {h.params / 1e9:.2f} B params ({h.source}); {size}")
    lines += ["", *format_phases(plan)]
    lines += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)


def format_phases(plan: Plan) -> list[str]:
    """The per-phase table: every component's GiB per GPU in rollout, update and sync."""
    names = list(plan.phases["update"] | plan.phases["rollout"] | plan.phases["sync"])  # update's order
    lines = [
        f"memory per GPU by phase, GiB (offload {'on' if plan.offload else 'off'}; "
        f"{plan.gpu_memory / GIB:g} GiB per GPU):",
        f"  {'':28s}" + "".join(f"{p:>10s}" for p in PHASES),
    ]
    for k in names:
        cells = [plan.phases[p].get(k, 0) / GIB for p in PHASES]
        lines.append(f"  {k:28s}" + "".join(f"{c:10.2f}" if c else f"{'-':>10s}" for c in cells))
    totals = [plan.phase_total(p) / GIB for p in PHASES]
    lines.append(f"  {'total':28s}" + "".join(f"{c:10.2f}" for c in totals))
    if plan.host_per_gpu:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in plan.host_per_gpu.items() if v)
        lines.append(
            f"host memory per node ({plan.gpus_per_node} GPUs): {plan.host_per_node / GIB:.1f} GiB of "
            f"{plan.host_memory / GIB:g} ({parts or 'nothing'} GiB per GPU)"
        )
    return lines
