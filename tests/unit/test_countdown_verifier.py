from scope_mega.data.countdown import Problem
from scope_mega.rewards.base import RewardConfig
from scope_mega.rewards.countdown_verifier import CountdownVerifier

PROBLEM = Problem((3, 7, 9), 30)


def test_verdicts_and_rewards():
    v = CountdownVerifier(reward=RewardConfig(format_penalty=0.5))
    ok = v.verify("7 * 3 = 21\n21 + 9 = 30\nanswer: 30", PROBLEM.prompt())
    assert (ok.correct, ok.reward, ok.extracted, ok.reason) == (True, 1.0, "30", "ok")
    wrong = v.verify("7 * 3 = 21\n21 + 9 = 31\nanswer: 31", PROBLEM.prompt())
    assert (wrong.correct, wrong.reward, wrong.extracted, wrong.reason) == (False, 0.0, "31", "mismatch")
    none = v.verify("7 * 3 = 21", PROBLEM.prompt())
    assert (none.correct, none.reward, none.extracted, none.reason) == (False, -0.5, None, "no_answer")
    assert v.verify("", PROBLEM.prompt()).reason == "no_answer"
