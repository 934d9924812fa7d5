"""Partial rollouts with bounded staleness (`rl.max_staleness` = k > 0): no step waits for its longest
response (docs/design.md section 3, "Partial rollouts").

Contract, per data-parallel replica (its driver holds a `RolloutBuffer`):
- Prompts come from a stream over the training prompts, epoch after epoch, each epoch a permutation
  seeded by the run's seed; replica r takes positions r, r + dp, r + 2 dp, ... A step keeps
  `need + rl.extra_prompts / dp` groups in flight (`need` = prompts_per_step / dp), issuing new positions
  as trained ones leave.
- Generation runs in rounds: every unfinished response of the buffer is continued, as its prompt plus
  the tokens it has so far, for at most `rl.partial_segment` new tokens (one engine call per round,
  one request per response, seeded by its position, member and length). After a round a replica
  with `need` finished groups (and none about to grow too stale, below) asks for nothing more; once
  every replica has, the step's generation stops. What is unfinished is aborted at that segment
  boundary and carried over with its tokens, its behaviour logprobs (the engine's, of the weights
  that sampled each token) and each token's policy version. Finished groups beyond `need` wait,
  finished, for a later step.
- The policy version is the number of RL steps done: during step s's rollouts the engines hold the
  weights of version s. After the update and the weight sync a carried response continues under the
  new weights: its whole prefix is prefilled again (the sync resets vLLM's prefix cache; the
  transformers engine keeps no cache between calls), so only the sampled tokens and their logprobs
  stay those of the old policy, which decoupled PPO corrects for (`rl.update`).
- Staleness: a token trained at step v has staleness v - version <= k. A step's generation goes on
  until no unfinished group has a token of version v - k (it would be too old next step), so a
  response spans at most k + 1 steps and long responses are not starved. The step trains `need`
  finished groups, those with the oldest tokens first (then by position). Before a step generates, a
  group whose oldest token is older than v - k (a finished group the step before had no room for) is
  regenerated (`rl.stale_groups="regenerate"`: its tokens are dropped and its prompt starts again) or
  dropped ("drop": its prompt is given up); both are counted.
- SCOPE sees only finished responses: the finished groups go through `rollouts.rollout_and_rectify`
  exactly as synchronous ones do.
- The buffer is plain data (`state()` / `RolloutBuffer.from_state`), kept in the RL checkpoint, so a
  resumed run trains every prompt of the stream exactly once (with "regenerate").
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from scope_mega.metrics import timed
from scope_mega.rl.rollouts import GroupTrajectories, sampling_params, verify_groups
from scope_mega.rollout.engine import Completion, SamplingParams, StopChecker
from scope_mega.runtime.served import gather_drivers
from scope_mega.tasks import Prompt, Task


@dataclass
class Response:
    """One response in flight: its tokens so far, each one's behaviour logprob and policy version;
    `finish` is None while unfinished, else "stop" or "length" (`stop_reason` as `Completion`'s)."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str | None = None
    stop_reason: str | int | None = None


@dataclass
class InFlight:
    """One prompt's group in flight: its stream position and its responses."""

    position: int
    responses: list[Response]

    @property
    def finished(self) -> bool:
        return all(r.finish is not None for r in self.responses)

    @property
    def oldest(self) -> int | None:
        """The oldest token's version (None: no token yet)."""
        return min((r.versions[0] for r in self.responses if r.versions), default=None)


@dataclass
class RolloutBuffer:
    """A replica's groups in flight and the next stream position it issues."""

    next_position: int
    groups: list[InFlight] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RolloutBuffer:
        groups = [InFlight(g["position"], [Response(**r) for r in g["responses"]]) for g in state["groups"]]
        return cls(state["next_position"], groups)


def stream_prompt(task: Task, position: int) -> Prompt:
    """The training prompt at `position` of the stream: epoch `position // len(train)`, a permutation
    of the training prompts seeded by the run's seed and the epoch."""
    epoch, index = divmod(position, len(task.train))
    return task.train[_epoch_order(task.cfg.seed, epoch, len(task.train))[index]]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def partial_rollouts(
    engine, task: Task, buffer: RolloutBuffer, need: int, version: int, dp: int
) -> tuple[list[Prompt], list[GroupTrajectories], dict[str, Any]]:
    """One step's rollouts on a replica's driver (collective over drivers): `need` finished groups,
    the oldest first, verified, with their prompts; the rest stays in `buffer`. Metrics: `async/*` of
    this replica (the trainer merges replicas, `merge_partial_metrics`)."""
    cfg = task.cfg.rl
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}
    last = version - cfg.max_staleness  # the oldest version a token trained now may have
    metrics.update(drop_stale(buffer, last, cfg.stale_groups, cfg.group_size))
    while len(buffer.groups) < need + cfg.extra_prompts // dp:
        buffer.groups.append(InFlight(buffer.next_position, _empty(cfg.group_size)))
        buffer.next_position += dp
    tokens = slots = rounds = 0
    with timed(timings, "rollout"):
        while True:
            todo = _open(buffer)
            # done: the step's groups are finished, and no unfinished group would be too stale next step
            done = sum(g.finished for g in buffer.groups) >= need and not any(
                g.oldest == last for g in buffer.groups if not g.finished
            )
            if not any(gather_drivers(not done)):
                break
            made, width = _round(engine, task, version, [] if done else todo)
            tokens, slots, rounds = tokens + made, slots + width, rounds + 1
    finished = sorted((g for g in buffer.groups if g.finished), key=lambda g: (g.oldest, g.position))
    taken = finished[:need]
    buffer.groups = [g for g in buffer.groups if g not in taken]
    prompts = [stream_prompt(task, g.position) for g in taken]
    completions = [[_completion(r, task) for r in g.responses] for g in taken]
    groups = verify_groups(task, prompts, completions, timings)
    metrics.update(timings)
    metrics.update(staleness_metrics(taken, version, cfg.max_staleness))
    metrics["async/carried"] = sum(not g.finished for g in buffer.groups)
    metrics["async/finished_waiting"] = sum(g.finished for g in buffer.groups)
    metrics["async/rounds"] = rounds
    if slots:  # the decode slots left empty: each round lasts its longest segment, at its full width
        metrics["rollout/engine_idle_frac"] = 1 - tokens / slots
    metrics["async/trained_positions"] = [g.position for g in taken]
    return prompts, groups, metrics


def _empty(n: int) -> list[Response]:
    return [Response() for _ in range(n)]


def drop_stale(buffer: RolloutBuffer, oldest_allowed: int, mode: str, n: int) -> dict[str, float]:
    """Regenerate or drop the groups with a token older than `oldest_allowed`; their counts."""
    stale = [g for g in buffer.groups if g.oldest is not None and g.oldest < oldest_allowed]
    if mode == "drop":
        buffer.groups = [g for g in buffer.groups if g not in stale]
    else:
        for g in stale:
            g.responses = _empty(n)
    return {
        "async/regenerated": float(len(stale) if mode == "regenerate" else 0),
        "async/dropped": float(len(stale) if mode == "drop" else 0),
    }


def _open(buffer: RolloutBuffer) -> list[tuple[InFlight, int]]:
    """The unfinished responses of the buffer, (group, member), oldest position first."""
    return [
        (g, i)
        for g in sorted(buffer.groups, key=lambda g: g.position)
        for i, r in enumerate(g.responses)
        if r.finish is None
    ]


def _round(engine, task: Task, version: int, todo: list[tuple[InFlight, int]]) -> tuple[int, int]:
    """One segment for each response in `todo` (an empty list still joins the collective call); the
    tokens it made, and the decode slots it held (its longest segment x its width)."""
    cfg = task.cfg
    seeds = [
        (cfg.seed * 1_000_003 + g.position * 7919 + i * 104_729 + len(g.responses[i].tokens)) % 2**31
        for g, i in todo
    ]
    return continue_responses(
        engine,
        [stream_prompt(task, g.position).ids for g, _ in todo],
        [g.responses[i] for g, i in todo],
        seeds,
        sampling_params(cfg, task, 1, None),
        cfg.rl.partial_segment,
        version,
        StopChecker(sampling_params(cfg, task, 1, None), task.stop_token_ids, task.tokenizer.decode),
    )


def continue_responses(
    engine,
    prompts: list[list[int]],
    responses: list[Response],
    seeds: list[int],
    sampling: SamplingParams,
    segment: int,
    version: int,
    stops: StopChecker,
) -> tuple[int, int]:
    """Continue each unfinished response, as its prompt plus its tokens so far, by at most `segment`
    tokens of `sampling` (`max_new_tokens` bounds the whole response; each request seeded by its
    `seeds` entry), recording `version` for every new token. A stop string that spans a segment
    boundary ends the response there (`stops` checks it as the engine would have). Returns the tokens
    made and the decode slots held (the longest segment x the number of requests)."""
    limit = sampling.max_new_tokens
    samplings = [
        dataclasses.replace(sampling, max_new_tokens=min(segment, limit - len(r.tokens)), seed=seed)
        for r, seed in zip(responses, seeds)
    ]
    outs = engine.generate_each([list(p) + r.tokens for p, r in zip(prompts, responses)], samplings)
    for r, (out,) in zip(responses, outs):
        _extend(r, out, version, stops, limit)
    made = [len(out.token_ids) for (out,) in outs]
    return sum(made), max(made, default=0) * len(made)


def _extend(r: Response, out: Completion, version: int, stops: StopChecker, limit: int) -> None:
    """Append a segment to a response, and end it where it stopped or reached `limit` tokens."""
    start = len(r.tokens)
    r.tokens += out.token_ids
    r.logprobs += out.logprobs
    r.versions += [version] * len(out.token_ids)
    if out.finish_reason == "stop":
        r.finish, r.stop_reason = "stop", out.stop_reason
    if r.finish is None and stops.strings and start:
        for end in range(start + 1, len(r.tokens) + 1):
            if isinstance(found := stops(r.tokens[:end]), str):
                del r.tokens[end:], r.logprobs[end:], r.versions[end:]
                r.finish, r.stop_reason = "stop", found
                break
    if r.finish is None and len(r.tokens) >= limit:
        r.finish = "length"


def _completion(r: Response, task: Task) -> Completion:
    text = task.tokenizer.decode(r.tokens)
    return Completion(list(r.tokens), list(r.logprobs), r.finish, r.stop_reason, text)


def merge_partial_metrics(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Every replica's `partial_rollouts` metrics as one: the trained positions of all, the staleness's
    oldest and newest over all, the rest averaged over replicas."""
    trained = sorted(p for m in replicas for p in m["async/trained_positions"])
    out: dict[str, Any] = {"async/trained_positions": trained}
    for key in {k for m in replicas for k in m} - set(out):
        values = [m[key] for m in replicas if key in m]
        pick = max if key == "async/staleness_max" else min if key == "async/staleness_min" else None
        out[key] = pick(values) if pick else sum(values) / len(values)
    return out


def staleness_metrics(groups: list[InFlight], version: int, k: int) -> dict[str, float]:
    """Per trained token: the staleness (version trained at minus version sampled) at its oldest,
    newest and mean, and its histogram `async/staleness_<j>` (fraction of tokens), j = 0..k."""
    ages = [version - v for g in groups for r in g.responses for v in r.versions]
    if not ages:
        return {}
    out = {
        "async/staleness_max": float(max(ages)),
        "async/staleness_min": float(min(ages)),
        "async/staleness_mean": sum(ages) / len(ages),
    }
    out.update({f"async/staleness_{j}": ages.count(j) / len(ages) for j in range(k + 1)})
    return out
