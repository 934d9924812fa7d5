"""Benchmark the per-step weight sync: TP=2 Megatron (gloo, CPU, 2 processes) -> transformers engine.

Reports, from one run: the sync's bandwidth (HF bytes delivered into the engine per second) next to
two physical references measured in the same processes -- a plain memcpy of the same bytes, and one
gloo all_gather moving the same bytes between the two ranks -- plus the split: export alone (no
engine: shards through the shared-memory slots into fresh tensors) and engine load alone
(`update_weights` from tensors already in memory). The first sync, which also moves the engine's
weights into the shared arena both ranks write into (once), is timed apart.

Memory: the peak extra resident memory of each rank during a sync (RSS sampled every millisecond over
a baseline taken after returning freed memory to the OS), next to the bucket size and the model size;
and the shared-memory slots each rank holds between syncs. glibc's mmap threshold is pinned low in
the worker processes so that freed tensors leave RSS at once: RSS then follows live memory rather than
the allocator's cache.

    .venv/bin/python tools/bench_weight_sync.py --hidden 1024 --layers 8 --bucket-mb 64
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from scope_mega.runtime.spawn import spawn_local

MB = 1 << 20


class PeakRSS:
    """Peak resident memory of this process while the context is open, sampled in a thread."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        self.stop = threading.Event()
        self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _settled_rss() -> int:
    """RSS after garbage collection and handing freed heap pages back to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def _memcpy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return best


def _all_gather_seconds(nbytes_per_rank: int, repeats: int) -> float:
    import torch.distributed as dist

    mine = torch.ones(nbytes_per_rank // 4)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_gather(out, mine)
        best = min(best, time.perf_counter() - start)
    return best


def _bench(args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    from scope_mega.config import ModelConfig, ParallelConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.rollout.hf_engine import HFEngine
    from scope_mega.rollout.weight_sync import sync_weights
    from scope_mega.runtime import shm
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    hf = dict(
        model_type="llama",
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    dev = init_distributed(tp=2, device="cpu", seed=0)
    model, spec = build_gpt_model(ModelConfig(hf_config=hf), ParallelConfig(tp=2), dev)
    rank = dist.get_rank()
    engine = HFEngine.from_config(spec.hf_config, decode=str) if rank == 0 else None
    bucket = args.bucket_mb * MB
    dist.barrier()
    start = time.perf_counter()
    sync_weights(engine, model, spec, bucket)  # also the warm-up (first touch of every page)
    first_s = time.perf_counter() - start

    def timed(target):
        dist.barrier()
        base = _settled_rss()
        dist.barrier()
        with PeakRSS() as peak:
            start = time.perf_counter()
            sync_weights(target, model, spec, bucket)
            seconds = time.perf_counter() - start
        return seconds, peak.peak - base

    syncs = [timed(engine) for _ in range(args.repeats)]
    slots_for_engine = shm.held_bytes()  # the engine's own weights are the shared arena: no slots
    sync_weights(None, model, spec, bucket)  # warm-up of the export-only path
    exports = [timed(None) for _ in range(args.repeats)]
    peer_extra = [max(extra for _, extra in syncs)]
    dist.broadcast_object_list(peer_extra, src=1)
    nbytes = sum(p.numel() * p.element_size() for p in engine.model.parameters()) if rank == 0 else 0
    sizes = [nbytes]
    dist.broadcast_object_list(sizes, src=0)
    gather_s = _all_gather_seconds(sizes[0] // 2, args.repeats)  # each rank sends its half
    if rank == 0:
        in_memory = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
        load_s = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.update_weights(in_memory)
            load_s = min(load_s, time.perf_counter() - start)
        del in_memory
        memcpy = _memcpy_seconds(nbytes, args.repeats)
        sync_s = min(s for s, _ in syncs)
        result = dict(
            model_bytes=nbytes,
            bucket_bytes=bucket,
            sync_s=sync_s,
            export_only_s=min(s for s, _ in exports),
            load_only_s=load_s,
            memcpy_s=memcpy,
            all_gather_s=gather_s,
            peak_extra_rss_bytes=max(extra for _, extra in syncs),
            peak_extra_rss_export_only_bytes=max(extra for _, extra in exports),
            peak_extra_rss_peer_bytes=peer_extra[0],
            shm_slots_bytes=slots_for_engine,
            shm_slots_export_only_bytes=shm.held_bytes(),
            first_sync_s=first_s,
        )
        Path(out).write_text(json.dumps(result))
    destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at start of the spawned workers
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        spawn_local(_bench, 2, args, out)
        r = json.loads(Path(out).read_text())
    print(
        f"model (HF bytes)        {r['model_bytes'] / MB:9.1f} MiB   bucket {r['bucket_bytes'] / MB:.0f} MiB"
    )
    rows = [
        ("sync Megatron TP=2 -> engine", r["sync_s"]),
        ("  export only (no engine)", r["export_only_s"]),
        ("  engine load only", r["load_only_s"]),
        ("  first sync (moves weights)", r["first_sync_s"]),
        ("memcpy, same bytes", r["memcpy_s"]),
        ("gloo all_gather, same bytes", r["all_gather_s"]),
    ]
    for label, seconds in rows:
        print(f"{label:30s} {seconds:8.3f} s  {r['model_bytes'] / seconds / 1e9:7.2f} GB/s")
    print(f"sync / memcpy bandwidth        {r['memcpy_s'] / r['sync_s']:8.1%}")
    print(f"engine load / memcpy           {r['memcpy_s'] / r['load_only_s']:8.1%}")
    print(f"sync / gloo all_gather         {r['all_gather_s'] / r['sync_s']:8.1%}")
    print(
        f"peak extra RSS (engine rank) {r['peak_extra_rss_bytes'] / MB:.1f} MiB during sync, "
        f"{r['peak_extra_rss_export_only_bytes'] / MB:.1f} MiB export only "
        f"(= {r['peak_extra_rss_bytes'] / r['bucket_bytes']:.2f} / "
        f"{r['peak_extra_rss_export_only_bytes'] / r['bucket_bytes']:.2f} buckets, "
        f"{r['peak_extra_rss_bytes'] / r['model_bytes']:.1%} / "
        f"{r['peak_extra_rss_export_only_bytes'] / r['model_bytes']:.1%} of the model); "
        f"peer rank {r['peak_extra_rss_peer_bytes'] / MB:.1f} MiB during sync"
    )
    print(
        f"shared-memory slots held per rank: {r['shm_slots_bytes'] / MB:.1f} MiB for the engine syncs, "
        f"{r['shm_slots_export_only_bytes'] / MB:.1f} MiB once export only ran "
        f"(= {r['shm_slots_export_only_bytes'] / r['bucket_bytes']:.2f} buckets)"
    )


if __name__ == "__main__":
    main()
