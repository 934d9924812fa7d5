"""Activation recompute (`model.recompute`) is exact on CPU in fp32, and keeps nothing without gradients.

One 2-process gloo run checks, at TP=2 and at PP=2, that one optimizer step with recompute selective,
full/uniform and full/block gives the same loss, grad norm and parameters as the same step without
recompute (the SFT loss on padded rows; at TP=2 also the RL policy loss with entropy on THD rows, the
trainer's packed layout, for selective and full). The comparison is bitwise (`==`, max |diff| 0.0):
the recomputed forward runs the very ops of the first one, on the same inputs and RNG states, and each
gradient meets the same additions in the same order (a layer input receives two contributions, the
residual's and the norm's, and a + b == b + a in floating point), so no tolerance is needed.
Measured: 0.0 in every case, dropout included.

Dropout 0.1 (hidden and attention, set on the `TransformerConfig` here; the trainer's is 0) makes the
RNG restoration matter: the recomputed forward must draw the masks of the first one, from the CPU
generator (hidden dropout) and the tracker's model-parallel state (attention dropout), through
`runtime.cpu`'s redirect of Megatron's checkpoint RNG (item 5 of its docstring). Without that restore
the recomputed masks differ and so do the gradients (shown once by disabling the restore).

The logprob forwards (reference, old logprobs, PRM) run under `torch.no_grad()`: with recompute on, such
a forward saves no tensor (the saved-tensors hook counts 0), so it keeps nothing for a backward. A
forward with gradients saves fewer bytes with recompute than without
(so the parity above really compares recompute against none).
"""

import contextlib
import json
from functools import partial
from pathlib import Path

import pytest
import torch

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

HF = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
SEQ, BATCH, MICRO = 16, 4, 2
# (name, recompute, method, layers); "none" is the reference of each layout and dropout
MODES = [
    ("selective", "selective", "uniform", 1),
    ("full-uniform-2", "full", "uniform", 2),
    ("full-block-1", "full", "block", 1),
]
DROPOUTS = (0.0, 0.1)


@contextlib.contextmanager
def _dropout(p: float):
    """`arch.transformer_config` with hidden and attention dropout `p`, for models built inside."""
    from scope_mega.models import arch

    original = arch.transformer_config

    def build(*args, **kwargs):
        config = original(*args, **kwargs)
        config.hidden_dropout = config.attention_dropout = p
        return config

    arch.transformer_config = build
    try:
        yield
    finally:
        arch.transformer_config = original


def _model_config(recompute: str, method: str, layers: int):
    from scope_mega.config import ModelConfig

    return ModelConfig(
        hf_config=dict(HF),
        make_vocab_size_divisible_by=64,
        recompute=recompute,
        recompute_method=method,
        recompute_num_layers=layers,
    )


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, HF["vocab_size"], (BATCH, SEQ + 1), generator=g)
    out = []
    for i in range(0, BATCH, MICRO):
        t = tokens[i : i + MICRO]
        mask = torch.ones(len(t), SEQ)
        mask[:, :3] = 0
        position_ids = torch.arange(SEQ).expand(len(t), SEQ)
        out.append(dict(input_ids=t[:, :-1], targets=t[:, 1:], position_ids=position_ids, loss_mask=mask))
    return out


def _thd_batches() -> list[dict]:
    """RL micro-batches in the THD layout (sequences end to end, `cu_seqlens`), for the policy loss."""
    from scope_mega.rl.batch import Sample, to_micro_batches

    g = torch.Generator().manual_seed(1)
    samples = []
    for n in (9, 14, 5, 11):
        response = torch.randint(3, HF["vocab_size"], (n,), generator=g).tolist()
        samples.append(Sample([4, 5, 6], response, [0.3] * n, [False] * n, [-1.0] * n))
    return to_micro_batches(samples, 1, 0, 24, thd=True)


def _one_step(tp: int, pp: int, model_cfg, dropout: float, thd: bool = False) -> dict:
    """Build from the seed, take one step (SFT loss on padded rows, or the RL policy loss with entropy
    on THD rows): loss, grad norm, the parameters after it, and the model."""
    from scope_mega.config import OptimConfig, ParallelConfig, RunConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.rl.update import rl_loss
    from scope_mega.runtime.distributed import init_distributed
    from scope_mega.train_step import lm_loss, setup_training, train_step

    parallel = ParallelConfig(tp=tp, pp=pp)
    dev = init_distributed(tp=tp, pp=pp, device="cpu", seed=7)  # re-seeds: same weights, same masks
    with _dropout(dropout):
        model, spec = build_gpt_model(model_cfg, parallel, dev)
    state = setup_training(model, spec.vocab_size, OptimConfig(lr=1e-3, clip_grad=1.0), parallel, 1)
    if thd:
        metrics = train_step(state, _thd_batches(), partial(rl_loss, RunConfig().loss), need_entropy=True)
    else:
        metrics = train_step(state, _batches(), lm_loss)
    params = [p.detach().clone() for p in model.parameters()]
    return dict(loss=metrics["loss"], grad_norm=metrics["grad_norm"], params=params, model=model)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _saved_in_forward(model, grad: bool) -> tuple[int, int]:
    """(tensors saved, bytes kept) by one forward of the first micro-batch on this stage."""
    from megatron.core import parallel_state

    from scope_mega.runtime.activations import SavedActivations

    mb = _batches()[0]
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.randn(SEQ, MICRO, HF["hidden_size"], requires_grad=grad)
        model.set_input_tensor(hidden)
    with torch.set_grad_enabled(grad), SavedActivations(model) as saved:
        model(mb["input_ids"], mb["position_ids"], attention_mask=None)
        result = saved.count, saved.nbytes()
    model.set_input_tensor(None)
    return result


def _layout_cases(tp: int, pp: int) -> dict:
    """Every mode and dropout against recompute none, on this layout."""
    report = {}
    for dropout in DROPOUTS:
        ref = _one_step(tp, pp, _model_config("none", "uniform", 1), dropout)
        ref_saved = _saved_in_forward(ref["model"], grad=True)[1]
        for name, recompute, method, layers in MODES:
            got = _one_step(tp, pp, _model_config(recompute, method, layers), dropout)
            model = got["model"]
            report[f"tp{tp}-pp{pp}-{name}-dropout{dropout}"] = dict(
                loss=abs(got["loss"] - ref["loss"]),
                grad_norm=abs(got["grad_norm"] - ref["grad_norm"]),
                params=_max_diff(got["params"], ref["params"]),
                saved_ratio=_saved_in_forward(model, grad=True)[1] / ref_saved,
                no_grad_saved=_saved_in_forward(model, grad=False)[0],
                ref_loss=ref["loss"],
            )
    return report


def _thd_cases(tp: int) -> dict:
    """Selective and full against none on the RL loss over THD rows, with dropout (TP layout)."""
    ref = _one_step(tp, 1, _model_config("none", "uniform", 1), 0.1, thd=True)
    report = {}
    for name, recompute, method, layers in MODES[:2]:
        got = _one_step(tp, 1, _model_config(recompute, method, layers), 0.1, thd=True)
        report[f"tp{tp}-thd-rl-{name}"] = dict(
            loss=abs(got["loss"] - ref["loss"]),
            grad_norm=abs(got["grad_norm"] - ref["grad_norm"]),
            params=_max_diff(got["params"], ref["params"]),
        )
    return report


def _worker(out: str) -> None:
    import torch.distributed as dist

    from scope_mega.runtime.distributed import destroy_distributed

    report = {}
    for tp, pp in [(2, 1), (1, 2)]:
        report.update(_layout_cases(tp, pp))
        if tp > 1:
            report.update(_thd_cases(tp))
        destroy_distributed(keep_process_group=True)  # the next layout re-uses the gloo group
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    destroy_distributed()


def test_recompute_matches_no_recompute_bitwise(tmp_path):
    spawn_local(_worker, 2, str(tmp_path))
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(report) == 2 * len(DROPOUTS) * len(MODES) + 2
        for case, r in report.items():
            where = f"rank {rank}, {case}: {r}"
            assert r["loss"] == 0.0 and r["grad_norm"] == 0.0 and r["params"] == 0.0, where
            if "thd" in case:
                continue
            assert r["saved_ratio"] < 1.0, where  # recompute really ran
            assert r["no_grad_saved"] == 0, where
        report = {case: r for case, r in report.items() if "thd" not in case}
        # dropout is really on: the reference losses with and without it differ
        losses = {case.split("-dropout")[1]: r["ref_loss"] for case, r in report.items()}
        assert len(set(losses.values())) == len(DROPOUTS), losses


def test_recompute_settings_map_onto_megatron_fields():
    from scope_mega.models.arch import SELECTIVE_MODULES, ArchError, recompute_settings

    none = recompute_settings(_model_config("none", "uniform", 1), "local", 4)
    assert none == {"recompute_granularity": None}
    selective = recompute_settings(_model_config("selective", "uniform", 1), "local", 4)
    assert selective == {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}
    assert SELECTIVE_MODULES["te"] == ("mlp",)  # fused attention keeps no s^2 term to recompute
    block = recompute_settings(_model_config("full", "block", 9), "local", 4)
    assert block == {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 4}
    with pytest.raises(ArchError, match="must divide the 4 layers"):
        recompute_settings(_model_config("full", "uniform", 3), "local", 4)
