"""Math answer checking: extract the final answer from a response, judge it with `math-verify`.

Extraction (ours, linear time, runs in the caller's process): the content of the LAST `\\boxed{...}` /
`\\fbox{...}` (balanced braces, also `\\boxed 5`), else the answer after the last "Final Answer:",
"The answer is" or "answer:". Equivalence (math-verify's `parse` + `verify`, sympy underneath) runs in
a persistent worker subprocess, because sympy can spend unbounded time in C code (`10^{10^{10^{10}}}`,
huge factorials) where math-verify's own `signal.alarm` timeout cannot reach and which would stall the
trainer: the worker gets whole batches, answers item by item, and is killed when one item exceeds
`timeout_s`; that item is reported as `reason="timeout"`, the rest of the batch is resent.

Workers are forked from a zygote: a process that imports math-verify and warms it up (a few checks
that pay sympy's lazy setup, 2-3 s more), then only forks. A replacement worker is up within
milliseconds of the kill, with everything imported and warm, so the 3-5 s a fresh interpreter needs
for that is paid once, at first use, and never by the call after a timeout (nor is a CPU spent on it
while other items are being judged).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path

import psutil

from scope_mega.rewards.base import RewardConfig, Verifier, VerifyResult, make_result

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_ANCHOR = re.compile(r"\bfinal\s+answer(?:\s+is\b)?\s*:?|the\s+answer\s+is\b\s*:?|\banswer\s*:", re.I)
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed`/`\\fbox` in `text`; None if absent, empty or unclosed (truncated)."""
    last = _last_match(_BOXED, text)
    if last is None:
        return None
    rest = text[last.end() :].lstrip()
    if not rest.startswith("{"):  # `\boxed 5`: one token
        token = re.match(r"[^\s$]*", rest).group(0).rstrip(".,;")
        return token or None
    depth = 0
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\":  # `\{`, `\}` and `\\` are not grouping braces
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip() or None
        i += 1
    return None


def extract_answer_line(text: str) -> str | None:
    """Answer after the last "Final Answer:" / "The answer is" / "answer:" anchor, else None.

    Takes the first math segment (`$..$`, `\\(..\\)`, `\\[..\\]`) of the paragraph after the anchor,
    else the first non-empty line up to the end of its sentence.
    """
    last = _last_match(_ANSWER_ANCHOR, text)
    if last is None:
        return None
    paragraph = re.split(r"\n\s*\n", text[last.end() : last.end() + 1000].strip("*: \t\n"), maxsplit=1)[0]
    math = _MATH_SEGMENT.search(paragraph)
    if math:
        answer = next(g for g in math.groups() if g is not None)
    else:
        answer = _SENTENCE_END.split(paragraph.split("\n", 1)[0], maxsplit=1)[0]
    return answer.strip(" \t\n*.,;") or None


def extract_answer(text: str) -> str | None:
    """The response's final answer: the last boxed expression, else an answer line, else None."""
    return extract_boxed(text) or extract_answer_line(text)


def reference_answer(reference: str) -> str:
    """Normalise a reference: take its last `\\boxed{}` if it has one, drop surrounding `$`."""
    return (extract_boxed(reference) or reference).strip().strip("$").strip()


def judge(answer: str, reference: str) -> tuple[bool, str]:
    """math-verify equivalence of two answer strings -> (correct, reason). Unbounded time: worker only."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not gold or not pred:
        return False, "parse_error"
    correct = verify(gold, pred, timeout_seconds=None)
    return correct, "ok" if correct else "mismatch"


def _serve(conn: Connection, cpu_limit_s: int) -> None:
    """A worker's loop: receive lists of (answer, reference), send one verdict per item, each under a
    CPU-time limit of `cpu_limit_s` more seconds (the kernel kills the worker even if the parent died
    and cannot); returns when the parent closes its end or is gone."""
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    try:
        while True:
            for answer, reference in conn.recv():
                usage = resource.getrusage(resource.RUSAGE_SELF)
                soft = int(usage.ru_utime + usage.ru_stime) + cpu_limit_s
                if cpu_hard != resource.RLIM_INFINITY:
                    soft = min(soft, cpu_hard)
                resource.setrlimit(resource.RLIMIT_CPU, (soft, cpu_hard))
                try:
                    verdict = judge(answer, reference)
                except Exception:
                    verdict = (False, "error")
                conn.send(verdict)
    except (EOFError, OSError):
        return


# math-verify's and sympy's lazy setup: the first check of each kind costs 0.5-2 s, later ones ~0.1 s
_WARM_UP = (("1", "1"), ("(x+1)^2", "x^2+2x+1"), (r"\frac{\sqrt{2}}{2}", r"\sqrt{3}/2"))


def _zygote_main(fd: int, memory_limit_mb: int, cpu_limit_s: int) -> None:
    """The zygote's loop on connection `fd`: once math-verify is imported and warmed up (`_WARM_UP`),
    each connection handle it receives gets a forked worker (`_serve`), and the worker's pid goes back.

    Limits, inherited by the workers: address space (a 10^{10^{10}} fails with MemoryError instead of
    taking the node down), no core dumps; Ctrl-C is the trainer's to handle. Workers are reaped by the
    kernel (SIGCHLD ignored), so a killed one never lingers as a zombie.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_limit_mb > 0:
        limit = memory_limit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we are the timeout
    for answer, reference in _WARM_UP:  # paid here once, inherited by every worker
        judge(answer, reference)

    conn = Connection(fd)
    try:
        conn.send("ready")
        while True:
            handle = reduction.recv_handle(conn)
            pid = os.fork()
            if pid == 0:  # the worker: never back into this loop, whatever happens
                try:
                    conn.close()
                    _serve(Connection(handle), cpu_limit_s)
                finally:
                    os._exit(0)
            os.close(handle)
            conn.send(pid)
    except (EOFError, OSError):  # the parent closed its end or is gone
        return


_ZYGOTE_COMMAND = (
    "import sys; from scope_mega.rewards.math_verifier import _zygote_main; "
    "_zygote_main(*map(int, sys.argv[1:]))"
)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def _stop_process(process: subprocess.Popen, conn: Connection) -> None:
    """Kill and reap the zygote; safe on a dead one. Also runs at garbage collection and interpreter exit."""
    conn.close()
    process.kill()
    process.wait()


def _stop_worker(process: psutil.Process, conn: Connection) -> None:
    """Kill a worker and wait until it is gone (the zygote's child: the kernel reaps it, but only while
    the zygote lives, so the zygote is stopped after it); safe on a dead one. Also at exit."""
    conn.close()
    with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
        process.kill()
        process.wait(timeout=5)


class _Worker:
    """One verification process, forked by the zygote, and the parent's end of its connection."""

    def __init__(self, conn: Connection, pid: int):
        self.conn = conn
        self.process = psutil.Process(pid)
        self.stop = weakref.finalize(self, _stop_worker, self.process, conn)

    def alive(self) -> bool:
        return self.process.is_running()


class _Zygote:
    """The process every worker is forked from, and the parent's end of its connection.

    A fresh interpreter (`python -c`), not multiprocessing's spawn: spawn re-imports the caller's
    `__main__` in the child, which breaks unguarded scripts and would load a whole trainer into it.
    """

    def __init__(self, memory_limit_mb: int, cpu_limit_s: int):
        self.conn, child_conn = multiprocessing.Pipe()
        fd = child_conn.fileno()
        pythonpath = os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE_COMMAND, str(fd), str(memory_limit_mb), str(cpu_limit_s)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": pythonpath},
        )
        child_conn.close()
        self.ready = False
        self.stop = weakref.finalize(self, _stop_process, self.process, self.conn)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the zygote has imported math-verify."""
        if self.ready:
            return
        if not self.conn.poll(timeout_s):
            self.stop()
            raise RuntimeError(f"math verifier worker did not start within {timeout_s} s")
        try:
            self.conn.recv()
        except EOFError:
            self.stop()
            raise RuntimeError("math verifier worker died at startup (see its stderr above)") from None
        self.ready = True

    def fork(self) -> _Worker:
        """A new worker, connected through a fresh socket pair whose other end the zygote receives."""
        mine, theirs = multiprocessing.Pipe()
        try:
            reduction.send_handle(self.conn, theirs.fileno(), self.process.pid)
        finally:
            theirs.close()
        return _Worker(mine, self.conn.recv())


@dataclass(frozen=True)
class MathVerifierConfig:
    """`timeout_s` bounds one item's equivalence check; the caps reject pathological input up front."""

    timeout_s: float = 5.0
    max_response_chars: int = 1_000_000
    max_answer_chars: int = 1_000
    memory_limit_mb: int = 4096
    startup_timeout_s: float = 120.0
    reward: RewardConfig = field(default_factory=RewardConfig)


class MathVerifier(Verifier):
    """Final-answer checker for math problems (thread-safe; call `close()` or use `with`).

    The zygote and the first worker start on first use; they are also stopped at garbage collection
    and at exit.
    """

    def __init__(self, config: MathVerifierConfig | None = None):
        self.config = config or MathVerifierConfig()
        self._zygote: _Zygote | None = None
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    def verify(self, response_text: str, reference: str) -> VerifyResult:
        """Judge one response against its reference answer."""
        return self.verify_batch([response_text], [reference])[0]

    def verify_batch(self, responses: Sequence[str], references: Sequence[str]) -> list[VerifyResult]:
        """Judge many responses with one worker round trip; identical (answer, reference) pairs run once."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        cfg = self.config
        results: list[VerifyResult | None] = []
        jobs: dict[tuple[str, str], list[int]] = {}
        for i, (response, reference) in enumerate(zip(responses, references)):
            if len(response) > cfg.max_response_chars:
                results.append(make_result(False, None, "too_long", cfg.reward))
                continue
            answer = extract_answer(response)
            gold = reference_answer(reference)
            if answer is None:
                results.append(make_result(False, None, "no_answer", cfg.reward))
            elif len(answer) > cfg.max_answer_chars:
                results.append(make_result(False, answer, "too_long", cfg.reward))
            elif not gold:
                results.append(make_result(False, answer, "parse_error", cfg.reward))
            else:
                results.append(None)
                jobs.setdefault((answer, gold), []).append(i)
        verdicts = self._run(list(jobs))
        for ((answer, _), indices), (correct, reason) in zip(jobs.items(), verdicts):
            for i in indices:
                results[i] = make_result(correct, answer, reason, cfg.reward)
        return results

    def close(self) -> None:
        """Stop the worker and the zygote (a later call starts new ones)."""
        with self._lock:
            for process in (self._worker, self._zygote):
                if process is not None:
                    process.stop()
            self._worker = self._zygote = None

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, jobs: list[tuple[str, str]]) -> list[tuple[bool, str]]:
        """Verdicts for `jobs` from the worker, restarting it after a timeout or a crash."""
        verdicts: list[tuple[bool, str]] = []
        with self._lock:
            while len(verdicts) < len(jobs):
                if self._worker is None or not self._worker.alive():
                    self._restart()
                worker = self._worker
                pending = jobs[len(verdicts) :]
                try:
                    worker.conn.send(pending)
                    for _ in pending:
                        if not worker.conn.poll(self.config.timeout_s):
                            verdicts.append((False, "timeout"))
                            self._restart()
                            break
                        verdicts.append(worker.conn.recv())
                except (EOFError, OSError):  # worker died (crash, memory): blame the current item
                    verdicts.append((False, "error"))
                    self._restart()
                except BaseException:  # e.g. KeyboardInterrupt: never leave a busy worker behind
                    worker.stop()
                    self._worker = None
                    raise
        return verdicts

    def _restart(self) -> None:
        """Kill the current worker (if any) and fork a fresh one from the zygote, which is started (and
        waited for) only on first use or after it died."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._zygote is None or not self._zygote.alive():
            self._zygote = _Zygote(self.config.memory_limit_mb, int(self.config.timeout_s) + 5)
        self._zygote.wait_ready(self.config.startup_timeout_s)
        self._worker = self._zygote.fork()
