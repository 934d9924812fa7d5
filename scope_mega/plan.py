"""The memory plan: how a config lays out its roles on W GPUs and what each GPU (and each node's host)
holds in every phase of an RL step. Numbers only: `make_plan` takes a config that
`validation.validate` accepted for the same target device and world size, and raises nothing;
`validation` refuses a plan that does not fit (`checked_plan`), `plan_report` prints it.

Layout per role (world size W GPUs, from `--world-size`, else $WORLD_SIZE / $SLURM_NTASKS, else TP*PP):
- policy trainer: Megatron TP x PP x DP with DP = W / (TP*PP*CP).
- rollout engine: `rollout.vllm_tensor_parallel_size` GPUs per replica (1 for the hf engine), W / TP_e
  replicas colocated with the trainer (the engine sleeps while the trainer runs).
- PRM (`guide.prm: model`): a Megatron forward-only model in the policy's TP x PP layout, colocated.
- guide (`scope.guide: engine`): a second engine of the rollout kind and TP.

Memory per GPU, bytes (P = parameters held by one GPU on the heaviest pipeline stage; TP-sharded
matrices divided by TP, norms replicated; embedding on the first stage, output layer on the last):
- weights: P * 2 (bf16) or P * 4 (fp32)
- grads: P * 4 (Megatron DDP with `grad_reduce_in_fp32=True`, as `train_step` builds it)
- Adam: P * 12 with bf16 params (fp32 master copy + m + v), P * 8 with fp32 params; the distributed
  optimizer divides this by DP. Both figures are printed; the total uses the configured one.
- FP8 weight copies (TE, FP8 on): 2 bytes per linear-layer parameter (the FP8 weight and its transpose).
- activations: `activation_bytes` (below), the stage's stored activations times the micro batches in
  flight on the first stage under 1F1B (min(PP, micro batches per step)), plus what a recompute
  recomputes at once, plus the last stage's logits buffers.
- engine: weights = params * (1 if vllm_fp8_weights else 2) / TP_e; budget = gpu_memory_utilization *
  GPU memory; KV cache = budget - weights (vLLM's own activation workspace is not subtracted); KV bytes
  per token = 2 (K and V) * layers * max(1, G / TP_e) * d * 2; the cache must hold one sequence of the
  engines' `max_model_len` (`rollout_max_model_len`: the longest prompt plus response, which the
  trainer passes to vLLM; `validation.check_fits` refuses a cache that cannot). The guide engine has
  its own budget (`guide.vllm_gpu_memory_utilization`); the transformers engine's is its weights plus
  the KV cache of its driver's whole batch. vLLM on CPU (fp32, 4 bytes) is given its KV cache in tokens
  instead (`vllm_kv_cache_tokens`, the same for the guide engine): budget = weights + that cache.
  `gpu_memory_utilization` there would be a share of the whole machine for every rank (vLLM's CPU
  rule), which two ranks on one node cannot both have; the tokens one step's rollouts hold at once are
  known from the config, need nothing from the machine, and the plan counts them exactly.
- PRM: bf16 weights / (TP * PP), stages taken as even; its forward holds one layer's activations for
  8 sequences.
  The PRM's and the guide's sizes come from their config.json where this machine can read it, else
  from `guide.prm_params_b` / `guide.guide_params_b`; with neither, `Helper.source` is None and
  the size 0.

Phases (trainer.py; offload = `rl.offload`, on for CUDA by default), per GPU, each plus RESERVE:
- rollout: trainer weights (+ FP8 copies, + KL reference), PRM weights and forward, both engines'
  budgets; grads and Adam only with offload off.
- update: trainer weights, grads, Adam, activations, PRM weights; each vLLM engine asleep keeps
  SLEEPING_ENGINE.
- sync: as rollout without the engines' KV caches: the policy engine's weights are woken first; two
  sync buckets in flight.
- host per node: offloaded Adam states and the weights of sleeping engines (level 1), per GPU, times
  the node's GPUs; at most HOST_USABLE of the node's memory.
A phase over the GPU's memory (or the host over its share) is refused by `validation.check_fits`.

Activations of the update (`activation_bytes`; bytes = elements x 2 in bf16, x 4 in fp32 on CPU).
Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), Section 4 / Table 2 and eq. 1-2: per layer sbh(34 + 5as/h) bytes without
parallelism, sbh(10 + 24/t + 5as/(ht)) with TP t, sbh(34/t + 5as/(ht)) with TP and sequence
parallelism, sbh(34/t) with selective recompute (no 5as/h attention term), 2sbh per layer with full
recompute (the layer's input). Adapted here to what these layers keep: RMSNorm, SwiGLU (ffn f, gate
and up projections), grouped-query attention (H query heads, G KV heads of size d), no dropout masks
(dropout is 0), no biases kept. Notation: t = TP, c = CP, sp = t with sequence parallelism (else 1),
T = tokens a GPU holds in one micro batch, s = the longest sequence's length (the keys a query sees).
Elements kept per token and layer, without recompute (`ModelSize.layer_activations`):
    a = 4h / sp                the two RMSNorm inputs and the two norm outputs (QKV's and fc1's inputs)
      + (2H + 2G) d / t        Q, K, V after RoPE and the attention output (the projection's input)
                               -- Transformer Engine's flash/fused attention keeps no s x s term;
      + 3f / t                 fc1's output (gate and up, 2f) and SwiGLU's output (fc2's input, f).
    The local spec (CPU, `transformer_impl: local`) materialises the attention probabilities
    [b, H/t, s, s] and expands K and V to H heads: its attention term is (4Hd + H s) / t, and at CP>1
    each GPU gathers the sequence's K and V from the others: (2Hd + 2Hd c + H s) / t.
Selective recompute (Megatron's `recompute_modules`, `models.arch.SELECTIVE_MODULES` per spec):
    "core_attn" keeps only the attention's inputs and output: (2H + 2G) d / t, no s x s term;
    "layernorm" drops the two norm outputs: - 2h / sp;
    "mlp" keeps only the MLP's input: - 3f / t (on Transformer Engine, whose fc1 holds the fused
    pre-MLP norm, its norm output too: - h / sp).
Full recompute keeps h / sp per token for each checkpointed chunk (its input): "uniform" with
    N = recompute_num_layers keeps L/N chunk inputs and, while one chunk's backward runs, that chunk's N
    layers whole (N x a, for one micro batch); "block" keeps N layer inputs and L - N layers whole, plus
    one layer whole while it is recomputed.
Per GPU: T = micro_batch_size x seq / c (padded), or with a token budget (per GPU, packed whole
sequences: budget x c per micro batch) T = max(budget, ceil(seq / c)), since a sequence longer than
the budget is a micro batch of its own. CP divides tokens; SP divides the h-wide terms by t.
The stage: bytes x T x L_stage x kept x in-flight micro batches, plus the larger of what one full
recompute holds (bytes x T x its layers whole) and, on the last stage, the loss's logits buffers,
T x padded_vocab / t x LOGIT_BYTES (the loss's backward runs, and frees them, before any layer's):
the fp32 tensors the log-softmax and the entropy keep for backward (13 B per element, measured with
saved-tensor hooks: the log-softmax's exp 4, the entropy's exp and shifted logits 8 and finiteness
mask 1) and the gradients their backward builds (12 B, measured: tools/bench_long_context.py's peak
minus saved). FP8 stores some GEMM inputs in 1 byte: with FP8 this is an upper bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from scope_mega.config import RunConfig

GIB = 1024**3


# ----------------------------------------------------------------------------- parameter counts


@dataclass(frozen=True)
class ModelSize:
    """The sizes the estimates need, read from an HF config (`models.arch` reads the same config for
    Megatron): parameter counts per layer, per GPU and in all, KV-cache and activation bytes."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, hf) -> ModelSize:
        from scope_mega.models import arch

        return cls(
            hidden=hf.hidden_size,
            layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads,
            kv_heads=arch.num_kv_heads(hf),
            head_dim=arch.head_dim(hf),
            ffn=hf.intermediate_size,
            vocab=hf.vocab_size,
            tied=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=arch.has_qkv_bias(hf),
            qk_norm=arch.has_qk_norm(hf),
        )

    def layer_sharded(self) -> int:
        """Parameters of one layer that TP splits (QKV with bias, attention output, gate/up/down)."""
        h, d, q = self.hidden, self.head_dim, self.heads * self.head_dim
        qkv_rows = q + 2 * self.kv_heads * d
        return qkv_rows * h + (qkv_rows if self.qkv_bias else 0) + q * h + 3 * h * self.ffn

    def layer_replicated(self) -> int:
        """Parameters of one layer every TP rank holds (the two RMSNorms, q/k norms)."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    def total(self, vocab: int | None = None) -> int:
        """All parameters, with `vocab` rows of embedding (default: the HF vocab, i.e. the HF count)."""
        v = self.vocab if vocab is None else vocab
        emb = v * self.hidden * (1 if self.tied else 2)
        return emb + self.layers * (self.layer_sharded() + self.layer_replicated()) + self.hidden

    def per_gpu(self, tp: int, pp: int, padded_vocab: int) -> int:
        """Parameters one GPU holds on the heaviest pipeline stage."""
        per_layer = self.layer_sharded() // tp + self.layer_replicated()
        stage = self.layers // pp * per_layer
        emb = padded_vocab * self.hidden // tp
        if pp == 1:
            return stage + emb * (1 if self.tied else 2) + self.hidden
        # embedding on the first stage; output layer (or its tied mirror) + final norm on the last
        return stage + emb + self.hidden

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_dim * dtype_bytes

    def layer_activations(self, lay: ActivationLayout, span: int, recomputed: tuple[str, ...] = ()) -> float:
        """Elements one layer keeps for backward per token a GPU holds (module docstring), with the
        `recomputed` submodules of selective recompute dropped; `span` is the keys a query sees (the
        local spec's s x s term)."""
        h, d, heads, t, sp = self.hidden, self.head_dim, self.heads, lay.tp, lay.sp
        norms = (2 if "layernorm" in recomputed else 4) * h / sp
        if lay.local_spec and "core_attn" not in recomputed:
            attention = (2 * heads * d + 2 * heads * d * lay.cp + heads * span) / t
        else:
            attention = (2 * heads + 2 * self.kv_heads) * d / t
        mlp = 3 * self.ffn / t
        if "mlp" in recomputed:
            mlp = 0.0 if lay.local_spec else -h / sp  # TE's fc1 holds the pre-MLP norm: its output goes too
        return norms + attention + mlp


@dataclass(frozen=True)
class ActivationLayout:
    """How a GPU holds the update's activations: parallel sizes, the layer spec, the recompute."""

    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    local_spec: bool = False  # Megatron's local layers: attention probabilities materialised
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"  # uniform | block (full)
    recompute_num_layers: int = 1
    selective_modules: tuple[str, ...] = ()
    dtype_bytes: int = 2

    @property
    def sp(self) -> int:
        """What sequence parallelism divides the h-wide activations by."""
        return self.tp if self.sequence_parallel and self.tp > 1 else 1


# fp32 bytes per logits element on the last stage at the loss's backward: what the log-softmax (4) and
# the entropy (9) keep, and the gradients the backward builds from them (12; measured on CPU with
# tools/bench_long_context.py: peak minus saved is 12 B per logits element at every length and recompute)
LOGIT_BYTES = 13 + 12


def activation_bytes(
    size: ModelSize,
    lay: ActivationLayout,
    stage_layers: int,
    tokens: int,
    span: int,
    in_flight: int = 1,
    logits: int = 0,
) -> int:
    """Bytes a pipeline stage of `stage_layers` layers keeps for `in_flight` micro batches of `tokens`
    tokens per GPU (module docstring), plus the larger of what a full recompute holds while it
    recomputes and the last stage's `logits` buffers (the loss's backward ends before the layers')."""
    whole = size.layer_activations(lay, span)
    layer_input = size.hidden / lay.sp
    recompute_once = 0.0
    if lay.recompute == "selective":
        kept = stage_layers * size.layer_activations(lay, span, lay.selective_modules)
    elif lay.recompute == "full" and lay.recompute_method == "uniform":
        n = min(lay.recompute_num_layers, stage_layers)
        kept, recompute_once = -(-stage_layers // n) * layer_input, n * whole
    elif lay.recompute == "full":  # block: the first n layers of the stage
        n = min(lay.recompute_num_layers, stage_layers)
        kept, recompute_once = n * layer_input + (stage_layers - n) * whole, whole
    else:
        kept = stage_layers * whole
    stored = lay.dtype_bytes * tokens * in_flight * kept
    return int(stored + max(lay.dtype_bytes * tokens * recompute_once, logits))


def model_size_of_dir(path: str | None) -> ModelSize | None:
    """The sizes of the model in `<path>/config.json` (an HF directory) or `<path>/hf/config.json` (a
    converted checkpoint) when that file is readable here, else None."""
    if path and (Path(path) / "hf" / "config.json").is_file():
        path = str(Path(path) / "hf")
    if not path or not (Path(path) / "config.json").is_file():
        return None
    import transformers

    try:
        return ModelSize.from_hf(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
    except Exception:  # an architecture transformers does not know: no estimate, not an error
        return None


VLLM_CPU_BLOCK_TOKENS = 128  # tokens per KV-cache block of vLLM's CPU attention (its block_size there)


def vllm_cpu_kv_tokens(sequences: int, seq_tokens: int, max_model_len: int) -> int:
    """The KV cache, in tokens, for `sequences` sequences of at most `seq_tokens` tokens at once on a
    vLLM engine on CPU: each sequence takes whole blocks, vLLM holds one block back, and the cache
    holds at least one `max_model_len` sequence (vLLM refuses to start otherwise). More requests than
    that at once are queued by vLLM's scheduler: slower, never an error."""
    per_seq = -(-seq_tokens // VLLM_CPU_BLOCK_TOKENS)
    blocks = max(sequences * per_seq, -(-max_model_len // VLLM_CPU_BLOCK_TOKENS))
    return (blocks + 1) * VLLM_CPU_BLOCK_TOKENS


def vllm_kv_cache_tokens(cfg: RunConfig, replicas: int) -> int:
    """The KV cache, in tokens, of one replica of a vLLM engine on CPU (module docstring): one RL
    step's rollouts at once -- its share of `rl.prompts_per_step` (prompts are dealt round-robin to
    the `replicas`, with partial rollouts `rl.extra_prompts` more in flight) times `rl.group_size`
    samples, each as long as a prompt and `rollout.max_new_tokens` can be (`data.max_prompt_tokens`
    for the math task; the model's `max_position_embeddings` bounds both, and is the whole bound for
    Countdown, whose prompts the config does not bound)."""
    from scope_mega.models.arch import load_hf_config

    positions = load_hf_config(cfg.model.hf_config).max_position_embeddings
    longest = min(positions, rollout_max_model_len(cfg) or positions)  # the engine's max_model_len
    in_flight = cfg.rl.prompts_per_step + (cfg.rl.extra_prompts if cfg.rl.max_staleness else 0)
    prompts = -(-in_flight // replicas)
    return vllm_cpu_kv_tokens(prompts * cfg.rl.group_size, longest, longest)


# ----------------------------------------------------------------------------- the plan


def sequence_tokens(cfg: RunConfig) -> int:
    """The longest sequence a step trains on: `data.max_prompt_tokens` (the math task; Countdown's
    prompts are not bounded by the config and short) plus `rollout.max_new_tokens`."""
    return (cfg.data.max_prompt_tokens if cfg.data.task == "math" else 0) + cfg.rollout.max_new_tokens


def rollout_max_model_len(cfg: RunConfig) -> int | None:
    """vLLM's `max_model_len` for the run's engines: the longest prompt plus response
    (`data.max_prompt_tokens + rollout.max_new_tokens`) for the math task, whose prompts the config
    bounds; None (the model's `max_position_embeddings`) for Countdown, whose prompts it does not.
    `validation` refuses a config whose sequences the model's positions cannot hold."""
    return sequence_tokens(cfg) if cfg.data.task == "math" else None


def micro_batch_tokens(cfg: RunConfig, seq: int) -> int:
    """Tokens one GPU holds in the update's largest micro batch (module docstring): the token budget
    is per GPU (budget x CP tokens of whole sequences per micro batch), and a sequence longer than
    budget x CP is a micro batch of its own, ceil(seq / CP) tokens per GPU."""
    cp = cfg.parallel.cp
    if cfg.rl.max_tokens_per_micro_batch:
        return max(cfg.rl.max_tokens_per_micro_batch, -(-seq // cp))
    return cfg.rl.micro_batch_size * -(-seq // cp)


def activation_layout(cfg: RunConfig, target: str, dtype_bytes: int) -> ActivationLayout:
    """The update's `ActivationLayout` for `cfg` on `target`: the local spec on CPU or where
    `model.transformer_impl: local`, else Transformer Engine; selective recompute's modules are the
    ones `models.arch` gives Megatron for that spec."""
    from scope_mega.models.arch import SELECTIVE_MODULES

    m, par = cfg.model, cfg.parallel
    local = target == "cpu" or m.transformer_impl == "local"
    return ActivationLayout(
        tp=par.tp,
        cp=par.cp,
        sequence_parallel=par.sequence_parallel,
        local_spec=local,
        recompute=m.recompute,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        selective_modules=tuple(SELECTIVE_MODULES["local" if local else "te"]),
        dtype_bytes=dtype_bytes,
    )


# Estimates the model cannot derive, stated once (check them against the trainer's memory/* metrics):
SLEEPING_ENGINE = 1 * GIB  # what a sleeping vLLM engine keeps on its GPU (CUDA graphs, allocator pools)
RESERVE = 3 * GIB  # per GPU and phase: the CUDA context, NCCL buffers, allocator fragmentation
HOST_USABLE = 0.9  # of a node's host memory, for the offloaded state and sleeping engines' weights
PHASES = ("rollout", "update", "sync")
PRM_BATCH = 8  # sequences per PRM forward (`MegatronPRM.max_batch_size`)


@dataclass
class Role:
    name: str
    tp: int
    pp: int
    dp: int  # data-parallel ranks (trainer) or replicas (engines)
    note: str = ""
    cp: int = 1


@dataclass
class TrainerMemory:
    params_per_gpu: int
    weights: int
    grads: int
    adam: int  # without the distributed optimizer
    adam_distributed: int  # with it (divided by DP)
    fp8_weights: int
    activations: int
    micro_batches_in_flight: int
    tokens_per_micro_batch: int  # per GPU (a CP rank holds 1/CP of a micro batch's tokens)
    distributed_optimizer: bool
    layout: ActivationLayout = field(default_factory=ActivationLayout)
    logits: int = 0  # of `activations`: the last stage's logits buffers

    @property
    def adam_used(self) -> int:
        return self.adam_distributed if self.distributed_optimizer else self.adam

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.adam_used + self.fp8_weights + self.activations


@dataclass
class EngineMemory:
    tp: int
    weights: int
    budget: int
    kv_cache: int
    kv_bytes_per_token: int
    max_tokens: int
    max_sequences: int  # full-length sequences that fit in the KV cache at once, per replica


@dataclass
class Helper:
    """The PRM or the guide engine: its size and where the size came from."""

    params: int  # 0 when its size is not known here (source None)
    source: str | None  # "<path>/config.json" or "guide.prm_params_b=N"; None: neither is known
    weights_per_gpu: int
    budget: int = 0  # an engine's share of the GPU (its weights and KV cache)


@dataclass
class Plan:
    target: str
    refusal_here: str | None
    world_size: int
    gpu_memory: int
    dtype: str
    params: int  # HF parameter count of the policy
    padded_vocab: int
    seq_len: int
    roles: list[Role]
    trainer: TrainerMemory
    engine: EngineMemory
    offload: bool
    phases: dict[str, dict[str, int]]  # phase -> component -> bytes per GPU
    host_per_gpu: dict[str, int]  # what the offload and sleeping engines keep in host memory, per GPU
    gpus_per_node: int
    host_memory: int  # per node
    helpers: dict[str, Helper] = field(default_factory=dict)  # "prm", "guide"
    warnings: list[str] = field(default_factory=list)

    def phase_total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def host_per_node(self) -> int:
        return sum(self.host_per_gpu.values()) * self.gpus_per_node


def default_world_size(cfg: RunConfig) -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp


def _helper_params(
    path: str | None, stated_b: float | None, key: str
) -> tuple[ModelSize | None, int, str | None]:
    """(sizes if readable, parameter count, its source) of the PRM or guide model at `path`; (None, 0,
    None) when neither its config.json nor `guide.<key>` says."""
    size = model_size_of_dir(path)
    if size is not None:
        return size, size.total(), f"{path}/config.json"
    if stated_b is not None:
        return None, int(stated_b * 1e9), f"guide.{key}={stated_b:g}"
    return None, 0, None


def make_plan(
    cfg: RunConfig,
    target: str = "cuda",
    world_size: int | None = None,
    gpu_memory_gib: float = 80.0,
    refusal_here: str | None = None,
    gpus_per_node: int = 8,
    host_memory_gib: float = 1024.0,
) -> Plan:
    """The layout and per-GPU memory of `cfg` on `world_size` GPUs of `gpu_memory_gib`, phase by phase,
    and the host memory per node of `gpus_per_node` GPUs. `cfg` is one `validation.validate` accepted
    for `target` and this world size; the plan says what does not fit, `validation.check_fits` refuses it."""
    from scope_mega.models.arch import load_hf_config, padded_vocab_size
    from scope_mega.runtime.offload import offload_wanted

    par = cfg.parallel
    hf = load_hf_config(cfg.model.hf_config)
    a = ModelSize.from_hf(hf)
    model_parallel = par.tp * par.pp * par.cp
    world = world_size or default_world_size(cfg)
    dp = world // model_parallel
    padded = padded_vocab_size(a.vocab, cfg.model.make_vocab_size_divisible_by, par.tp)
    dtype = cfg.model.params_dtype
    if dtype == "auto":
        dtype = "bfloat16" if target == "cuda" else "float32"
    pbytes = 2 if dtype == "bfloat16" else 4
    warnings = []

    # trainer
    p_gpu = a.per_gpu(par.tp, par.pp, padded)
    adam = p_gpu * (12 if pbytes == 2 else 8)
    fp8 = cfg.model.fp8.enabled and target == "cuda"
    linear_gpu = a.layers // par.pp * a.layer_sharded() // par.tp
    seq = sequence_tokens(cfg)
    seqs_per_rank = -(-cfg.rl.prompts_per_step * cfg.rl.group_size // dp)
    tokens_mb = micro_batch_tokens(cfg, seq)
    if cfg.rl.max_tokens_per_micro_batch:  # packed: tokens_mb x CP tokens of whole sequences each
        n_micro = max(1, seqs_per_rank * seq // (tokens_mb * par.cp))
    else:
        n_micro = max(1, -(-seqs_per_rank // cfg.rl.micro_batch_size))
    in_flight = min(par.pp, n_micro)
    layout = activation_layout(cfg, target, pbytes)
    stage_layers = a.layers // par.pp
    span = min(seq, tokens_mb * par.cp)  # the keys a query sees: its sequence, at most the micro batch
    logits = tokens_mb * padded // par.tp * LOGIT_BYTES
    first_logits = logits if par.pp == 1 else 0
    first = activation_bytes(a, layout, stage_layers, tokens_mb, span, in_flight, first_logits)
    last = activation_bytes(a, layout, stage_layers, tokens_mb, span, 1, logits)
    trainer = TrainerMemory(
        params_per_gpu=p_gpu,
        weights=p_gpu * pbytes,
        grads=p_gpu * 4,
        adam=adam,
        adam_distributed=-(-adam // dp),
        fp8_weights=2 * linear_gpu if fp8 else 0,
        activations=int(max(first, last)),
        micro_batches_in_flight=in_flight,
        tokens_per_micro_batch=tokens_mb,
        distributed_optimizer=par.distributed_optimizer,
        layout=layout,
        logits=logits,
    )
    gpu_mem = int(gpu_memory_gib * GIB)
    if par.distributed_optimizer and dp == 1:
        warnings.append("distributed_optimizer with DP=1 shards nothing")

    # rollout engine
    vllm = cfg.rollout.engine == "vllm"
    etp = cfg.rollout.vllm_tensor_parallel_size if vllm else 1
    wbytes = 1 if (vllm and cfg.rollout.vllm_fp8_weights) else (2 if target == "cuda" else 4)
    e_weights = a.total() * wbytes // etp
    kv_tok = a.kv_bytes_per_token(etp, 2 if target == "cuda" else 4)
    cpu_kv_tokens = vllm_kv_cache_tokens(cfg, world // etp) if vllm and target == "cpu" else 0
    if cpu_kv_tokens:
        budget = e_weights + cpu_kv_tokens * kv_tok
    elif vllm:
        budget = int(cfg.rollout.vllm_gpu_memory_utilization * gpu_mem)
    else:  # the transformers engine: its weights and the KV cache of the driver's whole batch
        budget = e_weights + seqs_per_rank * seq * kv_tok
    kv = max(0, budget - e_weights)
    engine = EngineMemory(
        tp=etp,
        weights=e_weights,
        budget=budget,
        kv_cache=kv,
        kv_bytes_per_token=kv_tok,
        max_tokens=kv // kv_tok,
        max_sequences=kv // kv_tok // max(seq, 1),
    )
    if vllm and (a.heads % etp or (etp <= a.kv_heads and a.kv_heads % etp)):
        warnings.append(f"vLLM TP={etp} does not divide the attention heads / KV heads")

    roles = [
        Role(
            "policy trainer (Megatron)",
            par.tp,
            par.pp,
            dp,
            f"{model_parallel} GPUs per model replica",
            par.cp,
        ),
        Role(
            f"rollout engine ({cfg.rollout.engine})",
            etp,
            1,
            world // etp,
            "colocated; sleeps while the trainer runs",
        ),
    ]
    helpers: dict[str, Helper] = {}
    scope_on = cfg.scope.enabled and cfg.scope.active_method != "grpo"
    prm_activations = 0
    if scope_on and cfg.guide.prm == "model":
        prm, n, source = _helper_params(cfg.guide.prm_path, cfg.guide.prm_params_b, "prm_params_b")
        roles.append(Role("PRM (Megatron, forward only)", par.tp, par.pp, dp, source, par.cp))
        helpers["prm"] = Helper(n, source, n * 2 // (par.tp * par.pp))  # bf16, the trainer's layout
        # one forward of PRM_BATCH sequences, one layer alive at a time (the policy's shape if unknown)
        prm_layout = replace(layout, recompute="none")
        prm_activations = activation_bytes(prm or a, prm_layout, 1, PRM_BATCH * -(-seq // par.cp), seq)
    elif scope_on:
        roles.append(Role("PRM", 0, 0, 0, "oracle (task checker, no GPU)"))
    if scope_on and cfg.scope.guide == "engine":
        g_size, n, source = _helper_params(cfg.guide.guide_model, cfg.guide.guide_params_b, "guide_params_b")
        roles.append(Role(f"guide engine ({cfg.rollout.engine})", etp, 1, world // etp, source))
        g_weights = n * wbytes // etp
        if cpu_kv_tokens:  # the guide's own KV bytes per token where its config is readable
            g_budget = g_weights + cpu_kv_tokens * (g_size or a).kv_bytes_per_token(etp, 4)
        else:
            g_budget = int(cfg.guide.vllm_gpu_memory_utilization * gpu_mem) if vllm else g_weights
        helpers["guide"] = Helper(n, source, g_weights, g_budget)
    elif scope_on:
        roles.append(Role("guide", 0, 0, 0, f"{cfg.scope.guide} (no GPU)"))

    offload = offload_wanted(cfg.rl.offload, target)
    phases, host = _phases(cfg, trainer, engine, helpers, prm_activations, offload, target)
    plan = Plan(
        target=target,
        refusal_here=refusal_here,
        world_size=world,
        gpu_memory=gpu_mem,
        dtype=dtype,
        params=a.total(),
        padded_vocab=padded,
        seq_len=seq,
        roles=roles,
        trainer=trainer,
        engine=engine,
        offload=offload,
        phases=phases,
        host_per_gpu=host,
        gpus_per_node=min(gpus_per_node, world),
        host_memory=int(host_memory_gib * GIB),
        helpers=helpers,
        warnings=warnings,
    )
    return plan


def _phases(
    cfg: RunConfig,
    t: TrainerMemory,
    e: EngineMemory,
    helpers: dict[str, Helper],
    prm_activations: int,
    offload: bool,
    target: str,
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Bytes per GPU of each component in each phase (module docstring), and per GPU in host memory."""
    cuda = target == "cuda"
    vllm = cfg.rollout.engine == "vllm"
    asleep = SLEEPING_ENGINE if (cuda and vllm) else 0
    kept = {  # on the GPU in every phase
        "trainer weights": t.weights,
        "trainer FP8 weight copies": t.fp8_weights,
        "KL reference weights": t.weights if cfg.loss.kl_coef > 0 else 0,
        "PRM weights": helpers["prm"].weights_per_gpu if "prm" in helpers else 0,
    }
    state = {"grads (fp32)": t.grads, "Adam states": t.adam_used}
    away = dict.fromkeys(state, 0) if offload else state  # outside the update
    guide = helpers.get("guide")
    rollout = {
        **kept,
        **away,
        "activations": prm_activations,  # the PRM's forward
        "policy engine": e.budget,
        "guide engine": guide.budget if guide else 0,
    }
    update = {
        **kept,
        **state,
        "activations": t.activations,
        "policy engine": asleep if cuda else e.budget,
        "guide engine": (asleep if cuda else guide.budget) if guide else 0,
    }
    sync = {
        **kept,
        **away,
        "activations": 2 * (cfg.rollout.sync_bucket_mb << 20),  # a gathered bucket and its converted copy
        "policy engine": e.weights + asleep if cuda else e.budget,
        "guide engine": (asleep if cuda else guide.budget) if guide else 0,
    }
    phases = {}
    for name, parts in zip(PHASES, (rollout, update, sync)):
        phases[name] = {k: v for k, v in parts.items() if v} | ({"reserve": RESERVE} if cuda else {})
    host = {}
    if cuda:
        host = {
            "offloaded Adam states": t.adam_used if offload else 0,
            # a sleeping vLLM engine at level 1 keeps its weights in host memory (the hf engine moves its
            # model there); level 2 discards them, the next sync rewrites them
            "policy engine weights": e.weights if not vllm or cfg.rollout.vllm_sleep_level == 1 else 0,
            "guide engine weights": guide.weights_per_gpu if guide else 0,
        }
    return phases, host
