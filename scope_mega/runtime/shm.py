"""Same-host shared memory for a CPU process group: every rank owns one persistent region in /dev/shm
that every rank of the group maps, so a rank reads a peer's data with one memcpy instead of a gloo
transfer (which copies through sockets several times and reaches a fraction of memcpy bandwidth).

Ranks tell each other when data is ready through FIFOs (one per ordered pair of ranks): a write is
kept until read, so a rank that signals early never waits for the other to be scheduled, as it would
in a barrier; the pipe's syscalls also order the memory accesses around them.

Files are unlinked as soon as every rank has opened them: nothing is left in /dev/shm even if a process
dies, and the memory goes when the last process unmaps it (`SharedRegions.close`, or exit). Regions
are created once per group and reused (`regions_for`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
PREFIX = "scope_mega_"
_SIGNAL = struct.Struct("<q")


class SharedRegions:
    """`views[i]`: group rank i's region as a uint8 tensor mapped in this process (empty if it has
    none); `signal` / `wait` pass integers between two ranks; `token`: the id the group agreed on when
    opening, to recognise the same set of regions later; `nbytes`: this rank's region size."""

    def __init__(
        self,
        maps: list[mmap.mmap | None],
        inbox: dict[int, int],
        outbox: dict[int, int],
        nbytes: int,
        token: int,
    ) -> None:
        self.maps = [m for m in maps if m is not None]
        self.inbox = inbox
        self.outbox = outbox
        self.nbytes = nbytes
        self.token = token
        self.calls = 0  # for users that number their exchanges (kept in step on every rank)
        empty = torch.empty(0, dtype=torch.uint8)
        self.views = [empty if m is None else torch.frombuffer(m, dtype=torch.uint8) for m in maps]

    @classmethod
    def open(cls, group, nbytes: int) -> SharedRegions | None:
        """Collective over `group`: create this rank's region of `nbytes` (none if 0) and its inbound
        FIFOs, then map every peer's region and open the FIFOs that peers read from this rank. None on
        every rank when some rank cannot (other host, no or a full /dev/shm): the caller then uses the
        process group."""
        size, me = dist.get_world_size(group), dist.get_rank(group)
        stem = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}_{secrets.token_hex(8)}")
        fifos = {j: f"{stem}_from{j}" for j in range(size) if j != me}
        mine: dict | None = {"region": stem, "nbytes": nbytes, "fifos": fifos}
        created: list[str] = []
        maps: list[mmap.mmap | None] = [None] * size
        inbox: dict[int, int] = {}
        outbox: dict[int, int] = {}
        try:
            if nbytes:
                maps[me] = _map(stem, nbytes, create=True)
                created.append(stem)
            for j, path in fifos.items():
                os.mkfifo(path, 0o600)
                created.append(path)
                inbox[j] = os.open(path, os.O_RDWR)  # RDWR: opening never blocks
        except OSError:
            mine = None
        paths: list[dict | None] = [None] * size
        dist.all_gather_object(paths, mine, group=group)
        ready = all(p is not None for p in paths)
        for j, theirs in enumerate(paths):
            if j == me or not ready:
                continue
            try:
                if theirs["nbytes"]:
                    maps[j] = _map(theirs["region"], theirs["nbytes"], create=False)
                outbox[j] = os.open(theirs["fifos"][me], os.O_RDWR)
            except OSError:
                ready = False
        agreed = torch.tensor([int(ready), secrets.randbits(62)])
        flags = [torch.empty_like(agreed) for _ in range(size)]
        dist.all_gather(flags, agreed, group=group)  # also: every rank has opened what it could
        for path in created:
            os.unlink(path)
        token = 0
        for flag in flags:
            token ^= int(flag[1])
        regions = cls(maps, inbox, outbox, nbytes, token or 1)
        if all(int(flag[0]) for flag in flags):
            return regions
        regions.close()
        return None

    def signal(self, to: int, value: int) -> None:
        """Send `value` to group rank `to` (returns at once)."""
        os.write(self.outbox[to], _SIGNAL.pack(value))

    def wait(self, sender: int) -> int:
        """The next value group rank `sender` signalled to this rank (blocks until there is one)."""
        return _SIGNAL.unpack(os.read(self.inbox[sender], _SIGNAL.size))[0]

    def close(self) -> None:
        """Unmap every region and close the FIFOs (memory is freed once no process maps it). A region
        some tensor still views is unmapped when the last such tensor is freed."""
        self.views = []
        for m in self.maps:
            with contextlib.suppress(BufferError):
                m.close()
        for fd in [*self.inbox.values(), *self.outbox.values()]:
            os.close(fd)
        self.maps, self.inbox, self.outbox = [], {}, {}


def _map(path: str, nbytes: int, create: bool) -> mmap.mmap:
    """Map the file at `path` (created with `nbytes` if `create`; removed again if that fails). The
    space is reserved at creation, so a full /dev/shm (small in containers) fails here, and the group
    falls back to the process group, instead of a SIGBUS at the first write."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR if create else os.O_RDWR, 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes)
    except OSError:
        if create:
            os.unlink(path)
        raise
    finally:
        os.close(fd)


_OPEN: dict[tuple[int, ...], SharedRegions | None] = {}
_UNKNOWN, _TOO_SMALL, _UNUSABLE = -2, -1, 0


def regions_for(group, nbytes: int) -> SharedRegions | None:
    """The group's regions of at least `nbytes`, opened on first use and kept (None: shared memory is
    not usable between these ranks). Collective over `group`: one small all_gather checks that every
    rank still holds the same regions, so a re-formed group or a restarted process opens new ones."""
    key = tuple(dist.get_process_group_ranks(group))
    held = _OPEN.get(key)
    if key not in _OPEN:
        state = _UNKNOWN
    elif held is None:
        state = _UNUSABLE
    else:
        state = held.token if held.nbytes >= nbytes else _TOO_SMALL
    mine = torch.tensor([state])
    states = [torch.empty_like(mine) for _ in key]
    dist.all_gather(states, mine, group=group)
    if state >= 0 and all(int(s) == state for s in states):
        return held
    if held is not None:
        held.close()
    _OPEN[key] = SharedRegions.open(group, nbytes)
    return _OPEN[key]


def close_all() -> None:
    """Unmap every region this process holds (tests; otherwise they live until exit)."""
    for regions in _OPEN.values():
        if regions is not None:
            regions.close()
    _OPEN.clear()


def held_bytes() -> int:
    """Bytes of the regions this process owns (one per group), for memory reports."""
    return sum(r.nbytes for r in _OPEN.values() if r is not None)
