"""The partial-rollout prompt stream and buffer (rl/partial.py), without an engine: each epoch is a
permutation of the training prompts, the buffer survives its JSON round trip (the checkpoint), and
stale groups are regenerated or dropped by the age of their oldest token."""

import json
from types import SimpleNamespace

from scope_mega.rl.partial import InFlight, Response, RolloutBuffer, drop_stale, stream_prompt


def test_each_epoch_of_the_stream_is_a_permutation_of_the_training_prompts():
    task = SimpleNamespace(train=list(range(10)), cfg=SimpleNamespace(seed=7))
    epochs = [[stream_prompt(task, e * 10 + i) for i in range(10)] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
    assert epochs[0] == [stream_prompt(task, i) for i in range(10)]  # a function of the position


def _buffer() -> RolloutBuffer:
    done = Response([5, 6], [-0.5, -1.25], [3, 4], "stop", 2)
    return RolloutBuffer(
        next_position=9,
        groups=[
            InFlight(1, [done, Response([7], [-2.0], [2])]),  # a token of version 2
            InFlight(3, [Response([8, 9], [-0.1, -0.2], [3, 3]), Response()]),
            InFlight(5, [Response(), Response()]),  # nothing generated yet
        ],
    )


def test_the_buffer_survives_the_checkpoint_exactly():
    state = json.loads(json.dumps(_buffer().state()))
    assert RolloutBuffer.from_state(state) == _buffer()


def test_groups_with_a_token_too_old_are_regenerated_or_dropped():
    buffer = _buffer()
    counts = drop_stale(buffer, oldest_allowed=3, mode="regenerate", n=2)
    assert counts == {"async/regenerated": 1.0, "async/dropped": 0.0}
    assert [g.position for g in buffer.groups] == [1, 3, 5]
    assert buffer.groups[0].responses == [Response(), Response()] and buffer.groups[1] == _buffer().groups[1]
    buffer = _buffer()
    assert drop_stale(buffer, oldest_allowed=4, mode="drop", n=2) == {
        "async/regenerated": 0.0,
        "async/dropped": 2.0,
    }
    assert [g.position for g in buffer.groups] == [5]
