"""Live export to model-parallel rank 0 only (`gather_hf_weights`), where the rollout engine lives,
through same-host shared memory where it can: full HF-named tensors from a running TP/PP-sharded
Megatron model, in bounded buckets, for the engine's `update_weights(named_tensors)` after every RL step.

On CPU, when the TP ranks share a host, shards travel through shared memory (`runtime.shm`) instead of
gloo, and the merge is fused with that copy: each block of a shard is copied once, straight to its
place in the HF tensor -- which, for an engine that lets the export write its weights in place
(`Destination`), is the engine's own weight, written by every TP rank in parallel. The block copies
are derived from `mapping.tp_merge` + `mapping.to_hf` themselves (`merge_plan`): no layout rule is
written twice. Other pipeline stages send their buckets to stage 0 point to point. Anywhere else
(CUDA/NCCL, TP ranks on several hosts) the export is `stream_collective.iter_hf_weights`, kept on
rank 0.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from scope_mega.runtime.shm import SharedRegions, regions_for
from scope_mega.weights.mapping import Binding, Dims, Rule, to_hf, tp_merge
from scope_mega.weights.stream_collective import (
    Bucket,
    Bucketer,
    exported_parameters,
    iter_hf_weights,
    recv_buckets,
    send_buckets,
)

Transport = Literal["auto", "group"]
ArenaLayout = dict[str, tuple[int, torch.dtype, torch.Size]]  # HF name -> (byte offset, dtype, shape)
ALIGN = 64  # byte alignment of each block in a shared-memory slot
_ARENAS: dict[tuple[int, ...], _Arena] = {}  # TP group's ranks -> its arena
_NO_ARENA, _NEW_ARENA = -2, -1


def gather_hf_weights(
    model,
    spec,
    bucket_bytes: int = 1 << 30,
    dest: Destination | None = None,
    transport: Transport = "auto",
) -> Iterator[Bucket]:
    """The buckets of `iter_hf_weights`, yielded on model-parallel rank 0 (TP and PP rank 0, where the
    rollout engine lives) only; every other rank yields nothing, but must still run the iterator to
    the end (collective over the model-parallel groups).

    With `transport="auto"` on CPU, TP ranks on one host move shards through shared memory, each
    block copied once, straight into its HF tensor (`merge_plan`):

    - into `dest`'s own weights when it has them in CPU memory: at TP > 1 they are first moved (once,
      by `dest.adopt_weights`) into an arena every TP rank maps, and from then on every TP rank writes
      its shards straight into them; the buckets then hold `dest`'s weights themselves, already
      filled. Ranks only write between the export's opening collective, which rank 0 enters when it
      calls this, and rank 0's wait for every peer's done signal.
    - otherwise peers write their shards into bucket-sized shared slots, double-buffered, from which
      rank 0 copies them into fresh tensors (or `dest`'s weights, where names and shapes match).

    Other stages send their buckets to stage 0 over the PP group. Anywhere else (CUDA/NCCL, TP ranks
    on several hosts), and with `transport="group"`, this is `iter_hf_weights` over the process
    groups, where at TP=1 tensors may alias live parameters.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    local, dims = exported_parameters(model, spec)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dest = dest if pp_rank == 0 and tp_rank == 0 else None
    shared = transport == "auto" and local[0][1].device.type == "cpu"
    fused, regions, arena = _shared_memory(local, dims, bucket_bytes, dest) if shared else (False, None, None)
    if not fused:
        for bucket in iter_hf_weights(model, spec, bucket_bytes):
            if tp_rank == 0 and pp_rank == 0:
                yield bucket
        return
    if arena is not None:
        mine = _arena_stage(local, dims, bucket_bytes, tp_group, arena)
    else:
        into = dest.writable_weights() if dest is not None else None
        mine = _fused_stage(local, dims, bucket_bytes, tp_group, regions, into)
    if tp_rank != 0:
        for _ in mine:  # a TP peer only writes its shards; rank 0 of its stage yields
            pass
        return
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        yield from mine
        return
    group = parallel_state.get_pipeline_model_parallel_group()
    stage_ranks = dist.get_process_group_ranks(group)
    if pp_rank == 0:
        yield from mine
        into = dest.writable_weights() if dest is not None else None
        for src in stage_ranks[1:]:
            yield from recv_buckets(src, group, into)
    else:
        send_buckets(mine, stage_ranks[0], group)


def release_shared_memory() -> None:
    """Unmap this process's slots and arenas now rather than at exit (an arena a destination still
    holds stays mapped until it lets go). Local: the next export finds them gone and opens new ones."""
    from scope_mega.runtime import shm

    shm.close_all()
    for arena in _ARENAS.values():
        arena.regions.close()
    _ARENAS.clear()


@functools.lru_cache(maxsize=4096)
def merge_plan(rule: Rule, shard_shape: tuple[int, ...], tp_size: int, dims: Dims) -> MergePlan:
    """The fused equivalent of `tp_merge` then `to_hf` for shards of `shard_shape` (one shard, rank 0's,
    for a replicated rule). Derived by running those very functions on shards that hold (rank, row)
    codes -- (rank, column) codes for `tp_dim` 1 -- so it follows the mapping and adds no layout rule;
    it fails if the mapping ever moves data across the other axis, which codes along one axis cannot
    express."""
    ranks = tp_size if rule.tp_dim is not None else 1
    axis = 1 if rule.tp_dim == 1 else 0
    meta = [torch.empty(shard_shape, device="meta")] * ranks
    shapes = tuple(t.shape for t in to_hf(rule, tp_merge(rule, meta), dims))
    n = shard_shape[axis]
    code_shape = (n, 1) if axis == 0 else (1, n)
    codes = [torch.arange(r * n, (r + 1) * n).reshape(code_shape) for r in range(ranks)]
    blocks = []
    for k, (out, shape) in enumerate(zip(to_hf(rule, tp_merge(rule, codes), dims), shapes)):
        kept = shape[1:] == shard_shape[1:] if axis == 0 else len(shape) == 2 and shape[0] == shard_shape[0]
        if not kept or out.shape[1 - axis] != 1 or out.shape[axis] != shape[axis]:
            raise ValueError(f"merge_plan: {rule.megatron} -> {rule.hf[k]} is not row/column block copies")
        c = out.reshape(-1)
        cut = torch.ones_like(c, dtype=torch.bool)
        cut[1:] = (c[1:] != c[:-1] + 1) | (c[1:] // n != c[:-1] // n)
        starts = [*cut.nonzero().flatten().tolist(), len(c)]
        for a, b in zip(starts, starts[1:]):
            rank, src = divmod(int(c[a]), n)
            blocks.append(MergeBlock(k, rank, src, a, b - a))
    return MergePlan(shapes, tuple(blocks), axis)


def copy_blocks(plan: MergePlan, outs: list[torch.Tensor], rank: int, rows: torch.Tensor, first: int) -> None:
    """Copy `rows` -- rows `[first, first + len(rows))` of TP rank `rank`'s shard -- into the HF tensors
    `outs`, as `plan` places them."""
    last = first + rows.shape[0]
    for block in plan.blocks:
        if block.rank != rank:
            continue
        if plan.axis == 1:
            cols = rows.narrow(1, block.src, block.length)
            outs[block.out][first:last].narrow(1, block.dst, block.length).copy_(cols)
            continue
        a, b = max(first, block.src), min(last, block.src + block.length)
        if a < b:
            dest = outs[block.out].narrow(0, block.dst + a - block.src, b - a)
            dest.copy_(rows.narrow(0, a - first, b - a))


def _shared_memory(
    local: list[tuple[Binding, torch.Tensor]], dims: Dims, bucket_bytes: int, dest: Destination | None
) -> tuple[bool, SharedRegions | None, _Arena | None]:
    """Whether the whole model-parallel group takes the shared-memory path (every TP group could set
    up its shared memory), and this TP group's arena, when TP rank 0 has a destination to adopt one,
    else its slots (neither at TP=1, where nothing travels). Collective over the TP group."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    regions = arena = None
    if tp_size > 1:
        arena = _arena(local, dims, tp_group, dest)
        if arena is None:
            rows = [_row_bytes(p) for b, p in local if b.rule.tp_dim is not None]
            regions = regions_for(tp_group, _align(max(bucket_bytes // 2, *rows)) * 2)
    ok = torch.tensor([int(tp_size == 1 or arena is not None or regions is not None)])
    model_parallel = parallel_state.get_model_parallel_group()
    if dist.get_world_size(model_parallel) > tp_size:  # else the TP group has agreed already
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=model_parallel)
    return bool(ok.item()), regions, arena


def _fused_stage(
    local: list[tuple[Binding, torch.Tensor]],
    dims: Dims,
    bucket_bytes: int,
    group,
    regions: SharedRegions | None,
    into: Mapping[str, torch.Tensor] | None,
) -> Iterator[Bucket]:
    """This stage's HF tensors in buckets, on TP rank 0 (the other TP ranks yield nothing).

    TP-split shards are cut into row blocks laid out in rounds of one slot (half of each rank's
    region). A peer copies round k into slot k % 2 and signals it; rank 0 copies its own rows of the
    round from its parameters, waits for that signal, then copies every peer's rows from shared memory
    straight into the HF tensors while the peers fill round k + 1. Rank 0 signals when it is done with
    a round, and a peer waits for that before reusing the round's slot (for round k + 2, or the next
    call).
    """
    tp_size, tp_rank = dist.get_world_size(group), dist.get_rank(group)
    split = [p.detach() if b.rule.tp_dim is not None and tp_size > 1 else None for b, p in local]
    slot = regions.nbytes // 2 // ALIGN * ALIGN if regions is not None else 0
    rounds = _rounds(split, slot)
    call = 0  # in every signal, so one left over from a failed call is caught
    if regions is not None:
        regions.calls += 1
        call = regions.calls << 32
    if tp_rank != 0:
        for k, blocks in enumerate(rounds):
            if k >= 2:
                _expect(regions, 0, call + k - 2)  # rank 0 is done with round k - 2: slot k % 2 is free
            for i, first, last, offset in blocks:
                rows = _slot_rows(regions.views[tp_rank], k, slot, offset, split[i], first, last)
                rows.copy_(split[i][first:last])
            regions.signal(0, call + k)
        for k in range(max(0, len(rounds) - 2), len(rounds)):
            _expect(regions, 0, call + k)
        return
    by_binding: dict[int, list[tuple[int, int, int, int]]] = {}
    for k, blocks in enumerate(rounds):
        for i, first, last, offset in blocks:
            by_binding.setdefault(i, []).append((k, first, last, offset))
    peers = range(1, tp_size)
    opened = -1
    bucket = Bucketer(bucket_bytes)
    for i, (binding, param) in enumerate(local):
        shard = param.detach()
        plan = merge_plan(binding.rule, tuple(shard.shape), tp_size, dims)
        found = [_in_place(name, shape, into) for name, shape in zip(binding.hf, plan.shapes)]
        fresh = [shape for shape, t in zip(plan.shapes, found) if t is None]
        yield from bucket.make_room(sum(shape.numel() for shape in fresh) * shard.element_size())
        outs = [
            torch.empty(shape, dtype=shard.dtype) if t is None else t for shape, t in zip(plan.shapes, found)
        ]
        if split[i] is None:
            copy_blocks(plan, outs, 0, shard, 0)
        for k, first, last, offset in by_binding.get(i, ()):
            copy_blocks(plan, outs, 0, shard[first:last], first)  # own rows first: peers may still write
            if k > opened:
                for rank in peers:
                    if opened >= 0:
                        regions.signal(rank, call + opened)
                    _expect(regions, rank, call + k)
                opened = k
            for rank in peers:
                rows = _slot_rows(regions.views[rank], k, slot, offset, shard, first, last)
                copy_blocks(plan, outs, rank, rows, first)
        for name, tensor in zip(binding.hf, outs):
            yield from bucket.add(name, tensor)
    if opened >= 0:
        for rank in peers:
            regions.signal(rank, call + opened)
    yield from bucket.flush()


def _expect(regions: SharedRegions, sender: int, value: int) -> None:
    """Wait for TP rank `sender`'s next signal, which must be `value`."""
    got = regions.wait(sender)
    if got != value:
        raise RuntimeError(f"weight export: TP rank {sender} signalled {got:#x}, expected {value:#x}")


def _arena(local, dims: Dims, group, dest: Destination | None) -> _Arena | None:
    """This TP group's arena for `dest` (given on TP rank 0 only), created and adopted by `dest` when
    missing or when `dest`'s weights are no longer in it (moved, or another destination). Collective
    over the TP group. None when TP rank 0 has no destination that holds every tensor of this stage
    (name and shape) in CPU memory and can adopt, or when the arena cannot be shared."""
    key = tuple(dist.get_process_group_ranks(group))
    held = _ARENAS.get(key)
    me = dist.get_rank(group)
    state = held.regions.token if held is not None else 0
    if me == 0:
        wanted = _stage_shapes(local, dims, len(key))
        weights = dest.writable_weights() if isinstance(dest, Destination) else {}
        layout = None
        if not all(name in weights and weights[name].shape == shape for name, shape in wanted):
            state = _NO_ARENA
        else:
            layout = _layout([(name, shape, weights[name].dtype) for name, shape in wanted])
            if held is None or not all(held.holds(name, weights[name]) for name, _ in wanted):
                state = _NEW_ARENA
        del weights  # adopting below frees the old storage tensor by tensor
    states = [torch.empty(1, dtype=torch.int64) for _ in key]
    dist.all_gather(states, torch.tensor([state]), group=group)
    first = int(states[0])
    if first == _NO_ARENA:
        return None
    if first > 0 and all(int(s) == first for s in states):
        return held
    if held is not None:
        held.regions.close()
        del _ARENAS[key]
    box = [layout if me == 0 else None]  # peers learn the layout only when it changes
    dist.broadcast_object_list(box, src=key[0], group=group)
    layout = box[0]
    nbytes = max((o + shape.numel() * dtype.itemsize for o, dtype, shape in layout.values()), default=0)
    regions = SharedRegions.open(group, nbytes if me == 0 else 0)
    if regions is None:
        return None
    arena = _Arena(regions, layout)
    if me == 0:
        dest.adopt_weights({name: arena.tensor(name) for name in layout})
    dist.barrier(group=group)  # adopted (old values copied in) before any peer writes
    _ARENAS[key] = arena
    return arena


def _stage_shapes(local, dims: Dims, tp_size: int) -> list[tuple[str, torch.Size]]:
    """Every HF tensor of this stage and its shape, in order."""
    out = []
    for binding, param in local:
        plan = merge_plan(binding.rule, tuple(param.shape), tp_size, dims)
        out += list(zip(binding.hf, plan.shapes))
    return out


def _layout(tensors: list[tuple[str, torch.Size, torch.dtype]]) -> ArenaLayout:
    """Consecutive aligned offsets for `tensors`."""
    layout, offset = {}, 0
    for name, shape, dtype in tensors:
        layout[name] = (offset, dtype, shape)
        offset += _align(shape.numel() * dtype.itemsize)
    return layout


def _arena_stage(
    local: list[tuple[Binding, torch.Tensor]],
    dims: Dims,
    bucket_bytes: int,
    group,
    arena: _Arena,
) -> Iterator[Bucket]:
    """Every TP rank copies its shards' blocks straight into the arena (replicated tensors: rank 0
    only) and signals rank 0, which then yields the arena's tensors in buckets."""
    tp_size, tp_rank = dist.get_world_size(group), dist.get_rank(group)
    arena.regions.calls += 1
    call = arena.regions.calls << 32
    for binding, param in local:
        split = binding.rule.tp_dim is not None
        if split or tp_rank == 0:
            shard = param.detach()
            plan = merge_plan(binding.rule, tuple(shard.shape), tp_size, dims)
            outs = [arena.tensor(name) for name in binding.hf]
            copy_blocks(plan, outs, tp_rank if split else 0, shard, 0)
    if tp_rank != 0:
        arena.regions.signal(0, call)
        return
    for rank in range(1, tp_size):
        _expect(arena.regions, rank, call)  # every peer's shards are in place
    bucket = Bucketer(bucket_bytes)
    for binding, _ in local:
        for name in binding.hf:
            yield from bucket.add(name, arena.tensor(name))
    yield from bucket.flush()


def _rounds(split: list[torch.Tensor | None], slot: int) -> list[list[tuple[int, int, int, int]]]:
    """Row blocks `(binding index, first row, end row, byte offset)` of the shards in `split` (None:
    not sent), packed in order into rounds of at most `slot` bytes; the same on every TP rank."""
    rounds: list[list[tuple[int, int, int, int]]] = []
    used = slot
    for i, shard in enumerate(split):
        if shard is None:
            continue
        row_bytes = _row_bytes(shard)
        first = 0
        while first < shard.shape[0]:
            fit = (slot - used) // row_bytes
            if fit <= 0:
                rounds.append([])
                used = 0
                continue
            last = min(shard.shape[0], first + fit)
            rounds[-1].append((i, first, last, used))
            used += _align((last - first) * row_bytes)
            first = last
    return rounds


def _slot_rows(
    region: torch.Tensor, k: int, slot: int, offset: int, shard: torch.Tensor, first: int, last: int
) -> torch.Tensor:
    """Rows `[first, last)` of a shard like `shard`, at `offset` in slot `k % 2` of `region`."""
    start = (k % 2) * slot + offset
    raw = region[start : start + (last - first) * _row_bytes(shard)]
    return raw.view(shard.dtype).view(last - first, *shard.shape[1:])


def _in_place(name: str, shape: torch.Size, into: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """`into[name]` when it has this shape (the export writes it in place), else None."""
    dest = into.get(name) if into else None
    return dest if dest is not None and dest.shape == shape else None


def _row_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() // tensor.shape[0] * tensor.element_size()


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@runtime_checkable
class Destination(Protocol):
    """Where model-parallel rank 0's tensors go, when they can be written in place (a rollout engine
    with its weights in CPU memory). `writable_weights()`: HF name -> the tensor that holds that
    weight now, the destination's own memory, never the trainer's (empty when there is none in CPU
    memory). `adopt_weights(tensors)`: copy the current values into `tensors` and hold the weights
    there from then on."""

    def writable_weights(self) -> Mapping[str, torch.Tensor]: ...

    def adopt_weights(self, tensors: Mapping[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class MergeBlock:
    """Rows (columns when `MergePlan.axis` is 1) `[src, src + length)` of TP rank `rank`'s shard are rows
    (columns) `[dst, dst + length)` of the binding's HF tensor number `out`."""

    out: int
    rank: int
    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class MergePlan:
    """`to_hf(rule, tp_merge(rule, shards), dims)` as block copies: HF shapes, and where shard blocks go."""

    shapes: tuple[torch.Size, ...]
    blocks: tuple[MergeBlock, ...]
    axis: int


@dataclass
class _Arena:
    """TP rank 0's destination weights in a shared region every TP rank maps: HF name -> (byte
    offset, dtype, shape), contiguous."""

    regions: SharedRegions
    layout: ArenaLayout

    def tensor(self, name: str) -> torch.Tensor:
        offset, dtype, shape = self.layout[name]
        nbytes = shape.numel() * dtype.itemsize
        return self.regions.views[0][offset : offset + nbytes].view(dtype).view(shape)

    def holds(self, name: str, tensor: torch.Tensor) -> bool:
        """`tensor` is exactly this arena's tensor `name` (where an adopting destination keeps it)."""
        offset, dtype, shape = self.layout[name]
        return (
            tensor.data_ptr() == self.regions.views[0].data_ptr() + offset
            and tensor.dtype == dtype
            and tensor.shape == shape
            and tensor.is_contiguous()
        )
