"""The Megatron PRM (Qwen2.5-Math-PRM layout) against the transformers reference `Qwen2ForProcessRewardModel`.

A tiny random HF PRM goes HF -> Megatron through the project's importer (`scope_mega.weights`, at
TP=2 on 2 gloo processes) and is loaded with `load_prm_weights`; `MegatronPRM` then scores a batch of
responses at TP=2, at PP=2 and at CP=2, and must give the reference's per-step probabilities. An unmapped head
parameter and a checkpoint without the head must both fail loudly.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

TP = 2
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
# Qwen2's chat template, reduced to what the PRM uses (system/user/assistant, no tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTIONS = ["What is 2 + 3 * 4?", "Solve x^2 = 9.", "Sum 1..4?"]
STEPS = [
    ["3 * 4 = 12.", "2 + 12 = 14.", "The answer is \\boxed{14}."],
    ["x = 3 or x = -3.", "The answer is \\boxed{\\pm 3}."],
    ["1 + 2 = 3", "3 + 3 = 7", "7 + 4 = 11", "\\boxed{11}"],
]
TOL = 1e-5


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Character-level tokenizer with Qwen's special tokens and chat template (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_hf_prm(path: Path, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A random fp32 `Qwen2ForProcessRewardModel`, every tensor drawn at random (norms around 1)."""
    from scope_mega.weights.hf_prm import Qwen2ForProcessRewardModel

    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,  # padded to 256 at TP=2: padding rows exist
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    model = Qwen2ForProcessRewardModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(path)
    return model


def reference_scores(model, tokenizer) -> list[list[float]]:
    """The model card's recipe: chat text, ids, softmax class 1 at the `<extra_0>` token mask."""
    from scope_mega.models.prm import prm_conversation, step_probabilities

    sep = tokenizer.convert_tokens_to_ids("<extra_0>")
    out = []
    for q, steps in zip(QUESTIONS, STEPS):
        ids = torch.tensor([tokenizer.encode(prm_conversation(tokenizer, q, steps))])
        with torch.no_grad():
            out += step_probabilities(model(ids), ids == sep)
    return out


def _expect_failure(fn) -> str:
    from scope_mega.weights.mapping import ConversionError

    try:
        fn()
    except ConversionError as err:
        return str(err)
    return "NO ERROR"


def _worker(root: str):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from scope_mega.config import ModelConfig, ParallelConfig
    from scope_mega.models.prm import MegatronPRM, build_prm_model, load_prm_weights
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.weights import files
    from scope_mega.weights.hf_to_megatron import plan_import, write_megatron_checkpoint

    root = Path(root)
    hf_dir, out = root / "hf", root / "meg"
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tok")
    plan = plan_import(hf_dir, out, TP, 1, force=False)
    device = init_distributed(tp=TP, pp=1, device="cpu", seed=7)
    rank = dist.get_rank()
    report: dict = {}
    try:
        if rank == 0:
            (out / "model").mkdir(parents=True)
            files.copy_side_files(hf_dir, out / "hf")
        dist.barrier()

        def build(plan, device):
            return build_prm_model(plan.model, plan.parallel, device)

        write_megatron_checkpoint(plan, device, out / "model", build)  # the project's importer
        cfg = ModelConfig(hf_config=str(hf_dir), transformer_impl="local")
        model, spec = build_prm_model(cfg, ParallelConfig(tp=TP), device)
        load_prm_weights(out, model, spec)
        prm = MegatronPRM(model, tokenizer, max_batch_size=2)  # batches of 2: padding exercised
        report["scores"] = prm.score_batch(QUESTIONS, STEPS)

        # An extra head parameter no rule maps: the importer and the loader refuse it.
        def extra_head(plan, device):
            model, spec = build(plan, device)
            model.score.add_module("3", torch.nn.Linear(2, 2))
            return model, spec

        model, spec = build_prm_model(cfg, ParallelConfig(tp=TP), device)
        report["import_unmapped"] = _expect_failure(
            lambda: write_megatron_checkpoint(plan, device, root / f"unused{rank}", extra_head)
        )
        model.score.add_module("3", torch.nn.Linear(2, 2))
        report["load_unmapped"] = _expect_failure(lambda: load_prm_weights(out, model, spec))

        # A checkpoint without the head (backbone only): loading it into the PRM fails.
        model, spec = build_prm_model(cfg, ParallelConfig(tp=TP), device)
        del model.score
        if rank == 0:
            (root / "nohead" / "model").mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(root / "nohead" / "model"))
        model, spec = build_prm_model(cfg, ParallelConfig(tp=TP), device)
        report["load_headless"] = _expect_failure(lambda: load_prm_weights(root / "nohead", model, spec))

        # A loader that writes nothing (or only part): the NaN poison catches every unset parameter.
        from scope_mega.weights.megatron_ckpt import load_model_weights

        def head_left_unset(path, model):  # loads everything, then "forgets" the head
            load_model_weights(path, model)
            model.score[0].weight.data.fill_(float("nan"))

        report["load_silent"] = _expect_failure(lambda: load_prm_weights(out, model, spec, head_left_unset))
        destroy_distributed(keep_process_group=True)

        # PP=2: the TP=2 checkpoint loads into two stages (score head on the last one only); MegatronPRM
        # scores through the pipeline schedule, and both stages return the last stage's scores.
        device = init_distributed(tp=1, pp=2, device="cpu", seed=8)
        model, spec = build_prm_model(cfg, ParallelConfig(pp=2), device)
        load_prm_weights(out, model, spec)
        report["pp_has_score"] = hasattr(model, "score")
        report["pp_scores"] = MegatronPRM(model, tokenizer, max_batch_size=2).score_batch(QUESTIONS, STEPS)
        destroy_distributed(keep_process_group=True)

        # CP=2: each rank runs its load-balanced half of every row; the step scores of both halves are
        # gathered, so both ranks return every step's score.
        device = init_distributed(tp=1, pp=1, cp=2, device="cpu", seed=9)
        model, spec = build_prm_model(cfg, ParallelConfig(cp=2), device)
        load_prm_weights(out, model, spec)
        report["cp_scores"] = MegatronPRM(model, tokenizer, max_batch_size=2).score_batch(QUESTIONS, STEPS)
    finally:
        (root / f"report{rank}.json").write_text(json.dumps(report))
        destroy_distributed()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prm")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "tok")
    model = write_hf_prm(root / "hf", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(root / "hf")  # side files of the checkpoint
    reference = reference_scores(model, tokenizer)
    spawn_local(_worker, TP, str(root))
    reports = [json.loads((root / f"report{r}.json").read_text()) for r in range(TP)]
    return {"reference": reference, "reports": reports}


def test_template_is_qwen_chatml():
    from scope_mega.models.prm import prm_conversation

    tok = tiny_tokenizer()
    text = prm_conversation(tok, "Q?", ["a", "b"], system="S")
    expected = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
        "<|im_start|>assistant\na<extra_0>b<extra_0><|im_end|>\n"
    )
    assert text == expected
    tok.chat_template = None  # no template: the built-in ChatML rendering is the same text
    assert prm_conversation(tok, "Q?", ["a", "b"], system="S") == expected
    assert tok.encode(text).count(tok.convert_tokens_to_ids("<extra_0>")) == 2


def test_megatron_prm_matches_transformers_reference(run):
    ref = run["reference"]
    assert [len(s) for s in ref] == [len(s) for s in STEPS]
    flat = [p for row in ref for p in row]
    assert any(0.05 < p < 0.95 for p in flat), f"reference probabilities saturated: {flat}"
    for rank, report in enumerate(run["reports"]):
        got = report["scores"]
        assert [len(s) for s in got] == [len(s) for s in STEPS]
        diff = max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g, r))
        print(f"rank {rank}: TP=2 max abs diff {diff:.3g}")
        assert diff <= TOL, f"rank {rank}: max abs diff {diff:.3g} > {TOL}"


def test_pipeline_parallel_stages(run):
    """PP=2: the head lives on the last stage only, and MegatronPRM's scores (micro-batches of 2 through
    the pipeline schedule, the last one padded with an empty row) match the reference on both stages."""
    first, last = run["reports"]
    assert not first["pp_has_score"] and last["pp_has_score"]
    assert first["pp_scores"] == last["pp_scores"]
    assert [len(s) for s in last["pp_scores"]] == [len(s) for s in STEPS]
    diff = max(abs(a - b) for g, r in zip(last["pp_scores"], run["reference"]) for a, b in zip(g, r))
    print(f"PP=2 max abs diff {diff:.3g}")
    assert diff <= TOL, f"PP=2: max abs diff {diff:.3g} > {TOL}"


def test_context_parallel_ranks(run):
    """CP=2: both ranks return the reference's scores, each having run half of every row."""
    first, last = run["reports"]
    assert first["cp_scores"] == last["cp_scores"]
    diff = max(abs(a - b) for g, r in zip(last["cp_scores"], run["reference"]) for a, b in zip(g, r))
    print(f"CP=2 max abs diff {diff:.3g}")
    assert [len(s) for s in last["cp_scores"]] == [len(s) for s in STEPS]
    assert diff <= TOL, f"CP=2: max abs diff {diff:.3g} > {TOL}"


def test_unwritten_parameters_fail(run):
    for report in run["reports"]:
        assert "PRM parameters not set by the checkpoint" in report["load_silent"]
        assert report["load_silent"].endswith(": score.0.weight"), report["load_silent"]


def test_unmapped_head_parameter_fails(run):
    for report in run["reports"]:
        assert "no qwen2_prm mapping: score.3.weight" in report["import_unmapped"]
        assert "no qwen2_prm mapping: score.3.weight" in report["load_unmapped"]


def test_checkpoint_without_head_fails(run):
    for report in run["reports"]:
        msg = report["load_headless"]
        assert msg != "NO ERROR"
        assert "score.0.weight" in msg, msg
