"""Micro-batching by token budget, in the padded and the packed (THD) layout.

Two layouts. Padded: a micro-batch is padded to its longest member, so it costs ``rows * longest``
token slots; packing keeps that within ``max_tokens`` while grouping similar lengths to keep padding
low. THD (packed): a micro-batch is its sequences laid end to end in one row, attention kept within
each by ``cu_seqlens``, so it costs the sum of their lengths.
"""


def pack_by_token_budget(lengths: list[int], max_tokens: int, thd: bool = False) -> list[list[int]]:
    """Split sequence indices into micro-batches of at most ``max_tokens`` token slots each:
    ``len(batch) * max(length)`` padded, or ``sum(length)`` with ``thd`` (packed end to end).

    First-fit-decreasing: indices sorted by length, longest first (ties by index, so the result is
    deterministic), each placed in the first micro-batch with room. Padded, a micro-batch's longest
    member is its first, and once one is full no later item fits it, so first-fit reduces to filling
    micro-batches one after another. Micro-batches come out in order of their first (longest) member;
    within one, indices are in decreasing length.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    for i, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"sequence {i} has length {length}; lengths must be >= 1")
        if length > max_tokens:
            raise ValueError(
                f"sequence {i} has length {length}, longer than the micro-batch token budget {max_tokens}"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    if not thd:
        for i in order:
            if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches
    loads: list[int] = []
    for i in order:
        fit = next((b for b, load in enumerate(loads) if load + lengths[i] <= max_tokens), None)
        if fit is None:
            batches.append([i])
            loads.append(lengths[i])
        else:
            batches[fit].append(i)
            loads[fit] += lengths[i]
    return batches


def cu_seqlens(lengths: list[int], align: int = 1) -> tuple[list[int], int]:
    """Boundaries ``[0, l0, l0 + l1, ...]`` of sequences packed end to end, and the padding that rounds
    the row up to a multiple of ``align`` (FP8 GEMMs and sequence parallelism need one). The padding,
    when there is any, is a segment of its own, so every position of the row lies in a segment."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    pad = -bounds[-1] % align
    if pad:
        bounds.append(bounds[-1] + pad)
    return bounds, pad
