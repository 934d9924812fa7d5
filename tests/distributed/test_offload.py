"""`rl.offload`'s round trip on 2 gloo processes (DP=2): after `to_host` the optimizer's storages and the
gradient buffers hold no memory; after `to_device` the parameters and the optimizer state are bitwise
what they were and the gradient buffers are zero (what the next step starts from), and the next step
equals that of a twin that never offloaded, bitwise. For fp32 and bf16 parameters, with and without the
distributed optimizer (whose shards are views into the buffers)."""

import pytest
import torch
from _tiny_policy import build_state

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

LAYOUTS = [("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]


def _step(state, seed: int, dev) -> float:
    import torch.distributed as dist

    from scope_mega.train_step import lm_loss, train_step

    g = torch.Generator().manual_seed(seed * 10 + dist.get_rank())
    ids = torch.randint(0, 64, (2, 17), generator=g).to(dev)
    batch = dict(
        input_ids=ids[:, :-1],
        targets=ids[:, 1:],
        position_ids=torch.arange(16, device=dev).expand(2, 16),
        loss_mask=torch.ones(2, 16, device=dev),
    )
    return train_step(state, [batch], lm_loss)["loss"]


def _tensors(state) -> list[torch.Tensor]:
    from scope_mega.runtime.offload import _optimizer_tensors

    return [p.detach().clone() for chunk in state.model for p in chunk.parameters()] + [
        t.detach().clone() for t in _optimizer_tensors(state)
    ]


def _worker(device: str = "cpu"):
    """Also run by tests/gpu/test_offload_cuda.py with `device="cuda"` (pinned host memory)."""
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.runtime.offload import TrainerOffload, _buffers

    dev = init_distributed(tp=1, device=device, seed=5)
    for dtype, distributed in LAYOUTS:
        state, twin = [build_state(dev, dtype, distributed, lr=1e-2) for _ in range(2)]
        offload = TrainerOffload(state, enabled=True)
        offload.to_host()  # before any step: the Adam state does not exist yet, masters do (bf16)
        offload.to_device()
        assert _step(state, 1, dev) == _step(twin, 1, dev)
        before = _tensors(state)
        adam = sum(s.nbytes() for s in offload._storages())
        offload.to_host()
        assert adam > 0 and offload.host_bytes() == adam  # what moved, no more
        assert all(h.is_pinned() == (dev.type == "cuda") for h in offload._host)
        assert all(s.nbytes() == 0 for s, _ in offload._moved)
        params = [p for chunk in state.model for p in chunk.parameters()]
        assert all(p.untyped_storage().nbytes() for p in params)  # the weights stay: the engines read them
        assert all(b.grad_data.untyped_storage().nbytes() == 0 for b in _buffers(state))
        offload.to_device()
        after = _tensors(state)
        assert len(after) == len(before)
        for a, b in zip(after, before):
            assert torch.equal(a, b), (dtype, distributed)
        assert all(torch.count_nonzero(b.grad_data) == 0 for b in _buffers(state))
        with offload.on_device():  # a no-op on the device; back to the host after the block if it was there
            pass
        assert not offload.on_host
        for step in (2, 3):  # steps from offloaded state equal the twin's, bitwise
            offload.to_host()
            offload.to_device()
            assert _step(state, step, dev) == _step(twin, step, dev), (dtype, distributed, step)
        for a, b in zip(_tensors(state), _tensors(twin)):
            assert torch.equal(a, b), (dtype, distributed)
    destroy_distributed()


def test_offload_round_trip_is_bitwise():
    spawn_local(_worker, 2)


def test_offload_setting():
    from scope_mega.runtime.offload import offload_wanted

    assert [offload_wanted(s, "cuda") for s in ("auto", "on", "off")] == [True, True, False]
    assert [offload_wanted(s, "cpu") for s in ("auto", "on", "off")] == [False, True, False]
