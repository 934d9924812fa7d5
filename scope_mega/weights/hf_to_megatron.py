"""HF safetensors -> Megatron `torch_dist` checkpoint, in one process or one per TP x PP shard.

Each rank builds its own stage of the model on the meta device (shapes and sharding, no weights), and
all ranks save together with `dist_checkpointing.save(model.sharded_state_dict())`, each chunk read
from the HF files it is made of (row blocks placed by `mapping.megatron_layout`) just as it is written.
So a rank holds about one chunk at a time (two: the writer runs two threads), whatever the model size,
and the result is an ordinary `torch_dist` checkpoint the trainer loads at any TP/PP. Output layout
(the trainer's checkpoints use the same `model/`):

    <out>/model/   torch_dist checkpoint of the unwrapped GPTModel's sharded_state_dict() (no prefix)
    <out>/hf/      the HF config, generation config, tokenizer files: what export needs to go back

Contract: bad input (arguments, config, missing, extra or wrongly shaped tensors) fails in `plan_import`,
before any process group or file exists, with one `ConversionError` line naming the tensor and file.
Everything is written under `<out>.tmp-XXXXXXXX`; an error in any rank or writer thread fails every
rank and removes it. It is renamed to `<out>` only once rank 0 has read its index back and checked it
against the files (`check_import_output`: every tensor, every chunk, every file's size).
"""

from __future__ import annotations

import contextlib
import io
import queue
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import torch
import torch.distributed as dist
import transformers

from scope_mega.config import ConfigError, ModelConfig, ParallelConfig, RunConfig
from scope_mega.models import arch
from scope_mega.validation import validate
from scope_mega.weights import files
from scope_mega.weights.mapping import (
    LAYER_PREFIX_MEGATRON,
    Binding,
    ConversionError,
    Dims,
    bind_parameters,
    bindings,
    family_for,
    hf_names,
    is_prm,
    megatron_layout,
    some_names,
)
from scope_mega.weights.megatron_ckpt import MegatronCheckpoint

T = TypeVar("T")


@dataclass
class ImportPlan:
    """What every rank needs, checked before any process group exists (so bad input fails everywhere
    at once, with one message, instead of hanging a collective)."""

    hf: transformers.PretrainedConfig
    checkpoint: files.HFCheckpoint
    model: ModelConfig
    parallel: ParallelConfig


def plan_import(
    hf_dir: str | Path, out: str | Path, tp: int, pp: int, force: bool, vocab_divisible_by: int = 128
) -> ImportPlan:
    """Check the arguments and the HF checkpoint (supported family, TP/PP fit, files complete, every
    tensor mapped and of the shape its config implies)."""
    for flag, value in (("--tp", tp), ("--pp", pp), ("--make-vocab-size-divisible-by", vocab_divisible_by)):
        if value < 1:
            raise ConversionError(f"{flag} must be >= 1, got {value}")
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"HF checkpoint directory {hf_dir} does not exist")
    hf = arch.load_hf_config(hf_dir)
    family_for(hf)
    ckpt = files.HFCheckpoint(hf_dir)
    check_hf_tensors(hf, ckpt.names)
    check_hf_shapes(hf, ckpt)
    exact = "bfloat16" if {t.dtype for t in ckpt.tensors.values()} == {torch.bfloat16} else "float32"
    model = ModelConfig(
        hf_config=structure_only(hf),
        transformer_impl="local",
        params_dtype=exact,  # fp32 holds bf16 and fp16 values exactly; export casts back
        make_vocab_size_divisible_by=vocab_divisible_by,
    )
    parallel = ParallelConfig(tp=tp, pp=pp)
    validate(RunConfig(device="cpu", model=model, parallel=parallel))
    files.check_output_dir(out, force)
    return ImportPlan(hf, ckpt, model, parallel)


def structure_only(hf: transformers.PretrainedConfig) -> dict:
    """The HF config the import builds its meta-device model from: only shapes and sharding matter
    there. RoPE scaling is dropped: it is no weight, and computing scaled frequencies needs real
    tensors, which a meta-device build does not have."""
    data = hf.to_dict()
    data.pop("rope_scaling", None)
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": arch.rope_theta(hf)}
    return data


def check_hf_tensors(hf: transformers.PretrainedConfig, present: list[str]) -> None:
    """Every HF tensor is used by the mapping, and every tensor the mapping needs is present."""
    expected = hf_names(hf)
    family = family_for(hf).name
    missing = [n for n in expected if n not in set(present)]
    if missing:
        raise ConversionError(f"HF tensors the {family} mapping needs are missing: {some_names(missing)}")
    unused = [n for n in present if n not in set(expected)]
    if unused:
        tied = bool(getattr(hf, "tie_word_embeddings", False))
        raise ConversionError(
            f"HF tensors not used by the {family} mapping (tie_word_embeddings={tied}): {some_names(unused)}"
        )


def check_hf_shapes(hf: transformers.PretrainedConfig, checkpoint: files.HFCheckpoint) -> None:
    """Every HF tensor has the shape transformers' own model of `hf` gives it (built on the meta
    device: no memory), so a wrongly shaped tensor fails here, named, before anything is written."""
    with torch.device("meta"):
        if is_prm(hf):
            from scope_mega.weights.hf_prm import Qwen2ForProcessRewardModel

            model = Qwen2ForProcessRewardModel(hf)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [n for n, t in checkpoint.tensors.items() if n in expected and t.shape != expected[n]]
    if wrong:
        name, more = wrong[0], f" ({len(wrong) - 1} more tensors too)" if len(wrong) > 1 else ""
        t, config = checkpoint.tensors[name], checkpoint.dir / "config.json"
        raise ConversionError(
            f"HF tensor {name} in {t.path} has shape {t.shape}, but {config} implies {expected[name]}"
            f"{more}: the weights and their config disagree"
        )


class ChunkSource:
    """Checkpoint chunks read from the HF files when they are written.

    A chunk is a slice of a Megatron checkpoint tensor in its global (TP=1) layout, the one
    `mapping.megatron_layout` describes: fused QKV grouped per KV head, `[gate; up]`, padded vocab.
    Layer tensors are stacked under one key (`decoder.layers.<suffix>`, first dim = layer). Each chunk
    is read row block by row block straight into a buffer of its own size: one copy of the data, and
    never more of a tensor in memory than the chunk being written (a TP rank's part, gate or up).
    """

    def __init__(self, hf: transformers.PretrainedConfig, checkpoint: files.HFCheckpoint):
        self.checkpoint = checkpoint
        self.dims = Dims.of(hf)
        self.by_key: dict[tuple[str, int | None], Binding] = {}
        for b in bindings(hf):
            if b.layer is None:
                self.by_key[(b.megatron, None)] = b
            else:
                suffix = b.megatron.split(".", 3)[3]  # decoder.layers.{i}.<suffix>
                self.by_key[(LAYER_PREFIX_MEGATRON + suffix, b.layer)] = b

    def chunk(
        self,
        key: str,
        offsets: tuple[int, ...],
        sizes: tuple[int, ...],
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The slice at `offsets` / `sizes` of checkpoint tensor `key` of global `shape`, as `dtype`,
        in a tensor that owns exactly its storage (else the writer would copy it once more)."""
        stacked = key.startswith(LAYER_PREFIX_MEGATRON) and (key, offsets[0]) in self.by_key
        b = self.by_key[(key, offsets[0] if stacked else None)]
        full_sizes = sizes
        if stacked:
            offsets, sizes, shape = offsets[1:], sizes[1:], shape[1:]
        rows = [self.checkpoint.stored(n).shape[0] for n in b.hf]
        layout = megatron_layout(b.rule, rows, self.dims, shape[0])
        start, stop = offsets[0], offsets[0] + sizes[0]
        out = torch.empty((sizes[0], *shape[1:]), dtype=dtype)
        read = self.checkpoint.read_rows
        for blk in layout.blocks:
            lo, hi = max(start, blk.dst), min(stop, blk.dst + blk.rows)
            if lo < hi:
                read(b.hf[blk.part], blk.src + lo - blk.dst, out[lo - start : hi - start])
        for lo, hi in layout.gaps():  # vocab padding: zero rows
            lo, hi = max(start, lo), min(stop, hi)
            if lo < hi:
                out[lo - start : hi - start] = 0
        if tuple(out.shape) != sizes:  # TP splits a later dimension: keep only this chunk's columns
            for dim, (offset, size) in enumerate(zip(offsets[1:], sizes[1:]), start=1):
                out = out.narrow(dim, offset, size)
            out = out.clone()
        return out.view(full_sizes)


def save_streaming(
    model: torch.nn.Module,
    source: ChunkSource,
    model_dir: Path,
    create_file: files.CreateFile = files.create_for_writing,
) -> None:
    """Collective: `dist_checkpointing.save(model.sharded_state_dict(), model_dir)` for a model whose
    parameters are on the meta device, each chunk's data coming from `source` as it is written.

    Megatron's own save resolves every tensor before writing (its async writer preloads them), so this
    strategy keeps Megatron's key translation, save planner and metadata (the result is an ordinary
    `torch_dist` checkpoint, loadable at any TP/PP) and writes through PyTorch's synchronous
    `FileSystemWriter`, which asks the planner for one chunk at a time. Each chunk gets a file of its
    own: the writer keeps the last chunk of every key it wrote to a file until that file is closed
    (embedding and output layer of the whole model, in one file per rank). The zip records' CRC32 is
    not computed: `torch.load` never checks it, and it costs as much time as writing the bytes. Files
    are written with O_DIRECT where the file system takes it (`files.DirectFile`), or opened with
    `create_file(path)` when given.

    Errors: one in any writer thread (torch's own writer loses those: the file stays empty, its chunk
    is left out of the index, and the save succeeds) stops the save and is raised on every rank,
    an `OSError` or `ConfigError` as a `ConversionError` naming the tensor chunk and the file.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystem, _write_files_from_queue
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
    from torch.futures import Future
    from torch.utils.serialization import config as serialization_config

    class ChunkPlanner(MCoreSavePlanner):
        def resolve_data(self, item: WriteItem):
            if item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(item)
            data = item.tensor_data
            chunk = data.chunk
            # in the model's dtype, which the metadata records
            args = (tuple(chunk.offsets), tuple(chunk.sizes), tuple(data.size), data.properties.dtype)
            return source.chunk(item.index.fqn, *args)

    class DirectFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with create_file(path) as stream:
                watched = WatchedStream(stream)
                try:
                    yield watched
                except Exception:
                    if watched.error is not None:  # the cause, not torch's "unexpected pos" after it
                        raise watched.error from None
                    raise

    class CheckedWriter(FileSystemWriter):
        """torch's writer, with `_write_data` rewritten so that an error in any writer thread reaches
        the caller once every thread has stopped (each takes no new file after the first error)."""

        def _write_data(self, planner, file_queue: queue.Queue) -> Future:
            results: queue.Queue = queue.Queue()
            errors: list[BaseException] = []

            def work() -> None:
                while not errors:
                    try:
                        entry = file_queue.get_nowait()  # (path, file name, [one write item])
                    except queue.Empty:
                        return
                    one: queue.Queue = queue.Queue()
                    one.put(entry)
                    try:
                        _write_files_from_queue(
                            self.fs.create_stream, one, results, planner, self.transforms,
                            self.per_thread_copy_ahead, self.sync_files, self.thread_count,
                            self.serialization_format,
                        )  # fmt: skip
                    except BaseException as e:  # noqa: BLE001 (raised below, in the caller's thread)
                        errors.append(write_error(entry[0], entry[2], e))

            threads = [threading.Thread(target=work) for _ in range(1, self.thread_count)]
            for t in threads:
                t.start()
            work()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            written = []
            while not results.empty():
                written += results.get_nowait()
            done: Future = Future()
            done.set_result(written)
            return done

    class StreamingSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            planner = ChunkPlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
            writer = CheckedWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=2)
            writer.fs = DirectFileSystem()
            try:
                with serialization_config.patch({"save.compute_crc32": False}):
                    dcp_save(mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=planner)
            except CheckpointException as e:  # every rank's failures, gathered: raise the first one's
                raise e.failures[min(e.failures)][0] from None

    with warnings.catch_warnings():  # Megatron's translation uses torch's deprecated ShardedTensor
        warnings.filterwarnings("ignore", message=".*ShardedTensor", category=FutureWarning)
        strategy = StreamingSave("torch_dist", 1)
        dist_checkpointing.save(model.sharded_state_dict(), str(model_dir), sharded_strategy=strategy)


class WatchedStream(io.RawIOBase):
    """An output stream as DCP's `torch.save` writes to it, keeping the first `OSError` a write raised
    (a full disk): torch's C++ zip writer drops it and fails later with "unexpected pos ..."."""

    def __init__(self, stream: BinaryIO):
        super().__init__()
        self.stream, self.error = stream, None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:  # DCP fsyncs it (without one, it would sync every file system)
        return self.stream.fileno()

    def tell(self) -> int:
        return self.stream.tell()

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as e:
            self.error = self.error or e
            raise


def write_error(path: str, items: list, error: BaseException) -> BaseException:
    """What to raise for `error` while writing the DCP write `items` to `path`: an `OSError` (a full
    disk, say) or a `ConfigError` (input the checks before could not see) as a `ConversionError`
    naming the tensor chunk and the file; anything else (a bug) unchanged."""
    if not isinstance(error, (OSError, ConfigError)):
        return error
    item = items[0]
    what = item.index.fqn
    if item.tensor_data is not None:
        what += f" (chunk at {tuple(item.tensor_data.chunk.offsets)})"
    converted = ConversionError(f"writing {what} to {path} failed: {error}")
    converted.__cause__ = error
    return converted


def write_megatron_checkpoint(
    plan: ImportPlan,
    device: torch.device,
    model_dir: Path,
    build=None,
    create_file: files.CreateFile = files.create_for_writing,
) -> None:
    """Collective: build this rank's stage on the meta device (no weights in memory), check that the
    stages together cover every HF tensor and bind every parameter, and stream-save `model_dir`.

    `build(plan, device) -> (model, spec)` defaults to `build_model`.
    """
    with torch.device("meta"):
        model, _ = (build or build_model)(plan, device)
    used = {n for binding, _, _ in bind_parameters(model, plan.hf) for n in binding.hf}
    everyone: list[set[str]] = [set() for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, used)
    unused = sorted(set(plan.checkpoint.names).difference(*everyone))
    if unused:  # same verdict on every rank: all raise together
        raise ConversionError(f"HF tensors not written to any Megatron parameter: {some_names(unused)}")
    save_streaming(model, ChunkSource(plan.hf, plan.checkpoint), model_dir, create_file)


def build_model(plan: ImportPlan, device: torch.device):
    """This rank's stage of the model the HF checkpoint describes."""
    if is_prm(plan.hf):
        from scope_mega.models.prm import build_prm_model

        return build_prm_model(plan.model, plan.parallel, device)
    from scope_mega.models.gpt import build_gpt_model

    return build_gpt_model(plan.model, plan.parallel, device)


def import_worker(
    hf_dir: str,
    out: str,
    tp: int,
    pp: int,
    force: bool = False,
    vocab_divisible_by: int = 128,
    create_file: files.CreateFile = files.create_for_writing,
) -> None:
    """Run on every rank of a world of exactly tp*pp processes (torchrun, srun or `spawn_local`);
    output files are opened with `create_file`."""
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    plan = plan_import(hf_dir, out, tp, pp, force, vocab_divisible_by)
    device = init_distributed(tp=tp, pp=pp, device="cpu")
    try:
        if dist.get_world_size() != tp * pp:
            raise ConversionError(f"launched {dist.get_world_size()} processes for --tp {tp} --pp {pp}")
        tmp: Path = on_rank0(lambda: new_import_dir(out))
        try:
            # returns on rank 0 once every rank's chunks are written (DCP gathers their results)
            write_megatron_checkpoint(plan, device, tmp / "model", create_file=create_file)
            on_rank0(lambda: publish_import(plan, hf_dir, tmp, out))
        except BaseException:
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        destroy_distributed()


def new_import_dir(out: str | Path) -> Path:
    """A fresh `<out>.tmp-XXXXXXXX` with an empty `model/`, where the ranks write."""
    tmp = files.new_temp_dir(out)
    (tmp / "model").mkdir()
    return tmp


def on_rank0(fn: Callable[[], T]) -> T:
    """Collective: `fn()` on rank 0; its result on every rank, or its exception raised on every rank
    (so no rank waits for a peer that has failed)."""
    box: list = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:  # noqa: BLE001 (raised below, on every rank)
            box[1] = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def publish_import(plan: ImportPlan, hf_dir: str | Path, tmp: Path, out: str | Path) -> None:
    """Add the HF side files to the written `tmp`, check it is complete, and rename it to `out`."""
    files.copy_side_files(hf_dir, tmp / "hf")
    check_import_output(plan.hf, tmp)
    files.publish(tmp, out)


def check_import_output(hf: transformers.PretrainedConfig, folder: Path) -> None:
    """Raise `ConversionError` unless `folder` is a complete import of a model of config `hf`: its
    `model/` index (read back) lists exactly the tensors the mapping writes, each fully covered by
    chunks whose bytes are in files of the sizes the index says, and `hf/` holds the config."""
    keys = {
        b.megatron if b.layer is None else LAYER_PREFIX_MEGATRON + b.rule.megatron
        for b in bindings(hf)
        if b.rule.export
    }
    MegatronCheckpoint(folder / "model").check_complete(keys)
    if not (folder / "hf" / "config.json").is_file():
        raise ConversionError(f"{folder / 'hf' / 'config.json'} was not written")
