"""A real, throw-away, single-node Slurm cluster for tests (Debian packages, no systemd, no slurmdbd).

`SlurmCluster` starts its own ``munged``, ``slurmctld`` and ``slurmd`` as child processes in the
foreground and owns their PIDs; everything they write lives under one fresh temporary directory, and the
TCP ports are picked free per session, so a stale cluster left running by an earlier session on the same
machine (or the distribution's own munged on /run/munge) does not interfere. Install the packages with
``.ci/install_slurm.sh``. Used by the ``slurm_cluster`` fixture in ``tests/slurm/conftest.py``; run this
file directly (``python tests/slurm/slurm_cluster.py``) to get an interactive cluster for debugging.

Layout of the temporary directory (``cluster.tmpdir``)::

    munge/munge.key   fresh random key, 0400 (dir 0700: munged refuses keys others can read)
    munge/munged.log, munged.seed
    run/munge.sock    munged socket; run/ and tmpdir are 0755 because munged refuses a socket
                      directory without execute permission for all ("Socket is inaccessible")
    run/*.pid         daemon PID files
    state/            StateSaveLocation
    spool/<node>/     SlurmdSpoolDir (batch scripts are copied here)
    log/              slurmctld.log, slurmd.log, *.out (daemon stdout/stderr), jobcomp.txt
    slurm.conf        the configuration below; there is deliberately NO cgroup.conf
    jobs/             a scratch directory for tests

The configuration, and why each non-default line is there:

* ``AuthType=auth/munge``, ``CredType=cred/munge``, ``AuthInfo=socket=<tmp>/run/munge.sock,
  cred_expire=<N>``: clients and daemons talk to *our* munged, never to a system one.
* ``cred_expire`` (default 120 s, here 10 s) is also the time a requeued job must wait before it is
  eligible again (``Reason=BeginTime``, EligibleTime = requeue time + cred_expire + 1). With the default
  a ``scontrol requeue`` test waited 2.5 minutes; with 5 s it took 6 s. 10 s keeps a margin for step
  launch on a loaded 2-core machine (it is also the lifetime of a step launch credential). It is read
  only at daemon start: ``scontrol reconfigure`` does not change it.
* ``SchedulerParameters=bf_interval=1,sched_interval=2``: a requeued job that becomes eligible again is
  started by the periodic scheduler; with the defaults (60 s / 30 s) the restart came up to ~30 s late.
* ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``, no cgroup.conf, and
  ``JobAcctGatherType=jobacct_gather/none``: no cgroup plugin is loaded at all, because on these
  machines a cgroup.conf present made slurmd fail to start (docs/design.md section 5). linuxproc tracks job
  processes through the /proc process tree, which is enough to signal and kill them.
* ``SlurmUser=root``, ``SlurmdUser=root``: the daemons run as root (tests run as root); no file
  ownership juggling for the slurm user.
* ``SlurmctldHost=<short hostname>(127.0.0.1)``, ``NodeName=<from slurmd -C> NodeAddr=127.0.0.1``:
  no DNS needed. The node line (CPUs, Boards, Sockets, Cores, Threads, RealMemory) is copied from
  ``slurmd -C``, so slurmd registers without complaint (measured: a node configured with 4 CPUs on this
  2-CPU machine went to state INVAL, "Low socket*core*thread count, Low CPUs", unless
  ``SlurmdParameters=config_overrides`` is set; that is what ``SlurmCluster(cpus=N)`` does).
* ``SlurmctldPort`` / ``SlurmdPort``: free ports picked at start, so two clusters never collide.
* ``SelectType=select/cons_tres``, ``SelectTypeParameters=CR_Core`` (memory is not a consumable, so
  jobs need no ``--mem``), and the default partition with ``OverSubscribe=FORCE:4``: several jobs may
  share the cores (measured: two 2-task jobs ran at the same time on 2 cores). Within one job, an
  ``srun`` with ``--ntasks=2`` runs next to the batch step. A job asking for more tasks than the node
  has CPUs is accepted by sbatch but stays PENDING forever (``Reason=PartitionConfig``) unless it
  passes ``--overcommit``, or the cluster is built with ``SlurmCluster(cpus=N)`` (a 4-task job then
  ran on this 2-core machine with ``cpus=4``).
* ``AccountingStorageType=accounting_storage/none`` (no slurmdbd, so no ``sacct``). Exit codes of
  finished jobs are read from ``scontrol show job`` (``ExitCode=<code>:<signal>``), which keeps
  finished jobs for ``MinJobAge=3600`` s, with ``JobCompType=jobcomp/filetxt`` (``log/jobcomp.txt``)
  as a fallback once the record is gone.
* ``JobRequeue=1``: batch jobs are requeueable by default; ``scontrol requeue $SLURM_JOB_ID`` from
  inside the job works, the second run sees ``SLURM_RESTART_COUNT=1``.
* ``ReturnToService=2``: a node that was DOWN comes back when slurmd registers.
* ``MpiDefault=none``: the pmix plugin is present but libpmix is not. slurmctld.log still shows
  harmless errors at start: "can not load PMIx library", "Configured MailProg is invalid", and
  "Could not open ... state file" (a fresh StateSaveLocation; ``slurmctld -i`` ignores them).

Signals: ``scancel --signal=USR1 --batch <job>`` reaches the batch shell only. ``#SBATCH
--signal=B:USR1@N`` with ``--time`` works too, but slurmctld checks time limits periodically, so the
signal arrives up to ~30 s later than N seconds before the end (measured: @50 with --time=1 came at
17 s). bash runs a trap only after the foreground command returns: use short sleeps or
``cmd & wait $!`` in scripts that trap signals.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Binaries the harness needs. Daemons are in /usr/sbin on Debian, which may not be on a user's PATH.
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin")

# Job states after which the job will not run again (REQUEUED/PENDING/RUNNING/COMPLETING are not final).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


class SlurmError(RuntimeError):
    """The cluster did not start, a client command failed, or a job did not finish in time."""


def search_path() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(dict.fromkeys([p for p in parts if p] + list(_EXTRA_PATH)))


def which(name: str) -> str | None:
    return shutil.which(name, path=search_path())


def missing_binaries() -> list[str]:
    """Names of the Slurm/MUNGE programs that are not installed (empty when everything is there)."""
    return [b for b in DAEMONS + CLIENTS if which(b) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


_KV = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)")


def parse_kv_line(line: str) -> dict[str, str]:
    """Parse one ``Key=Value Key2=Value2`` line as printed by ``scontrol show ... -o``.

    Values may contain ``=`` (``TRES=cpu=2,node=1``) and ``:`` (``ExitCode=3:0``); a value that
    contains a space followed by ``Word=`` would be split, which scontrol's fields do not do.
    """
    return {m.group(1): m.group(2) for m in _KV.finditer(line.strip())}


@dataclass
class JobResult:
    """Final outcome of a job. ``exit_code``/``signal`` come from ``ExitCode=<code>:<signal>``."""

    job_id: int
    state: str
    exit_code: int
    signal: int
    restarts: int
    info: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0


class SlurmCluster:
    """One slurmctld + one slurmd + munged on this machine, all under ``tmpdir``.

    Attributes for tests: ``env`` (a dict to pass as ``env=`` to subprocess; has ``SLURM_CONF`` and a
    PATH with /usr/sbin, and no ``SLURM_*`` variables inherited from an enclosing job), ``conf_path``,
    ``tmpdir``, ``jobs_dir`` (scratch space), ``log_dir``, ``node`` (node name), ``partition``,
    ``cpus`` (CPUs of the node as configured).
    """

    def __init__(
        self,
        tmpdir: str | os.PathLike | None = None,
        *,
        cred_expire: int = 10,
        cpus: int | None = None,
        debug: str = "info",
        keep_tmpdir: bool = False,
    ):
        self._own_tmpdir = tmpdir is None
        self.tmpdir = Path(tempfile.mkdtemp(prefix="scope-mega-slurm-") if tmpdir is None else tmpdir)
        self.keep_tmpdir = keep_tmpdir
        self.cred_expire = cred_expire
        self.requested_cpus = cpus
        self.debug = debug
        self.conf_path = self.tmpdir / "slurm.conf"
        self.run_dir = self.tmpdir / "run"
        self.munge_dir = self.tmpdir / "munge"
        self.state_dir = self.tmpdir / "state"
        self.spool_dir = self.tmpdir / "spool"
        self.log_dir = self.tmpdir / "log"
        self.jobs_dir = self.tmpdir / "jobs"
        self.jobcomp_path = self.log_dir / "jobcomp.txt"
        self.munge_socket = self.run_dir / "munge.sock"
        self.partition = "debug"
        self.node = ""
        self.cpus = 0
        self.ctld_port = 0
        self.slurmd_port = 0
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, object] = {}
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 90.0) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise SlurmError(
                f"Slurm/MUNGE not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh"
            )
        if os.geteuid() != 0:
            raise SlurmError("the test cluster must be started as root (slurmd launches jobs as their user)")
        try:
            self._prepare_dirs()
            self.env = self._client_env()
            self._start_munged()
            self._write_conf()
            self._start_daemon("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf_path)])
            self._wait_for(
                lambda: self._run_ok(["scontrol", "ping"], "UP"), timeout, "slurmctld to answer ping"
            )
            self._start_daemon("slurmd", [which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf_path)])
            self._wait_for(self._node_idle, timeout, f"node {self.node} to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Cancel remaining jobs, then terminate (and after ``grace`` s kill) the daemons we started."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None and self.env:
            with contextlib.suppress(Exception):
                ids = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
                if ids:
                    self.run(["scancel", *ids], check=False, timeout=10)
                    deadline = time.monotonic() + grace
                    while (
                        time.monotonic() < deadline
                        and self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip()
                    ):
                        time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if name == "slurmd":
                self._kill_orphan_stepds()
        for f in self._logs.values():
            with contextlib.suppress(Exception):
                f.close()
        self._logs.clear()
        if self._own_tmpdir and not self.keep_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items()}

    # ------------------------------------------------------------------ client helpers
    def run(
        self, args: list[str], *, check: bool = True, timeout: float = 60.0, cwd=None
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command (``["scontrol", "show", "node"]``) against this cluster."""
        exe = which(args[0]) or args[0]
        proc = subprocess.run(
            [exe, *map(str, args[1:])],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def sbatch(self, script_path: str | os.PathLike, *args: str, cwd=None) -> int:
        """Submit a batch script; ``args`` are sbatch options (before the script) . Returns the job id.

        ``cwd`` defaults to the script's directory (the job's working directory and where
        ``slurm-<id>.out`` goes unless the script says ``--output``).
        """
        script_path = Path(script_path).resolve()
        cwd = Path(cwd) if cwd is not None else script_path.parent
        out = self.run(["sbatch", "--parsable", *args, str(script_path)], cwd=cwd).stdout.strip()
        return int(out.splitlines()[-1].split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o <id>`` as a dict (``JobState``, ``ExitCode``, ``Restarts``, ...).

        Falls back to the jobcomp file (fewer fields) once slurmctld has purged the record;
        returns ``{}`` if the job is unknown to both.
        """
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        for line in proc.stdout.splitlines():
            info = parse_kv_line(line)
            if info.get("JobId") == str(job_id):
                return info
        return self._jobcomp_info(job_id)

    def wait(self, job_id: int, timeout: float = 60.0, poll: float = 0.25) -> JobResult:
        """Wait until the job is in a final state (a requeued job is waited for through its reruns)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in FINAL_STATES:
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                return JobResult(
                    job_id=job_id,
                    state=state,
                    exit_code=int(code or 0),
                    signal=int(sig or 0),
                    restarts=int(info.get("Restarts", "0") or 0),
                    info=info,
                )
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} not finished after {timeout:.0f} s: {info}\n{self.diagnostics()}"
                )
            time.sleep(poll)

    def wait_state(
        self, job_id: int, states: set[str] | str, timeout: float = 60.0, poll: float = 0.2
    ) -> dict:
        """Wait until ``JobState`` is one of ``states`` (e.g. ``"RUNNING"``); returns the job info."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} never reached {states}: {info}\n{self.diagnostics()}")
            time.sleep(poll)

    def diagnostics(self, lines: int = 30) -> str:
        """Tails of the daemon logs, for failure messages."""
        out = []
        for path in sorted(self.log_dir.glob("*")):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------------ internals
    def _prepare_dirs(self) -> None:
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.tmpdir, 0o755)
        for d in (self.run_dir, self.state_dir, self.spool_dir, self.log_dir, self.jobs_dir):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o700)

    def _client_env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = search_path()
        return env

    def _open_log(self, name: str):
        f = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - closed in stop()
        self._logs[name] = f
        return f

    def _start_munged(self) -> None:
        key = self.munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        args = [
            which("munged"),
            "--foreground",
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={self.run_dir / 'munged.pid'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        self._start_daemon("munged", args)
        munge, unmunge = which("munge"), which("unmunge")

        def munge_ok() -> bool:
            if not self.munge_socket.exists():
                return False
            if not (munge and unmunge):
                return True
            cred = subprocess.run([munge, "-n", "-S", str(self.munge_socket)], capture_output=True)
            if cred.returncode:
                return False
            check = subprocess.run(
                [unmunge, "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True
            )
            return check.returncode == 0

        self._wait_for(munge_ok, 30, "munged to accept credentials")

    def _start_daemon(self, name: str, args: list) -> None:
        daemon_env = dict(self.env)  # slurmstepd inherits it: SLURM_CONF identifies our steps in stop()
        self._procs[name] = subprocess.Popen(
            [str(a) for a in args],
            env=daemon_env,
            stdin=subprocess.DEVNULL,
            stdout=self._open_log(name),
            stderr=subprocess.STDOUT,
            cwd=self.tmpdir,
            start_new_session=True,
        )

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode} during startup\n{self.diagnostics()}")

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(subprocess.TimeoutExpired):
                if predicate():
                    return
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.2)

    def _run_ok(self, args: list[str], needle: str) -> bool:
        proc = self.run(args, check=False, timeout=10)
        return proc.returncode == 0 and needle in proc.stdout

    def _node_idle(self) -> bool:
        proc = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], check=False, timeout=10)
        return proc.returncode == 0 and proc.stdout.strip().rstrip("*") == "idle"

    def _hardware(self) -> dict[str, str]:
        out = subprocess.run(
            [which("slurmd"), "-C"], capture_output=True, text=True, check=True, env=self.env, timeout=30
        ).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
        return parse_kv_line(line)

    def _write_conf(self) -> None:
        hw = self._hardware()
        self.node = hw["NodeName"]
        host = socket.gethostname().split(".")[0]
        real_cpus = int(hw["CPUs"])
        self.cpus = self.requested_cpus or real_cpus
        node_fields = ["Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory"]
        if self.cpus != real_cpus:
            # A larger (fake) node: one socket, one thread per core, slurmd told to trust the config.
            node_line = (
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Boards=1 SocketsPerBoard=1 "
                f"CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={hw.get('RealMemory', '1000')}"
            )
            overrides = "SlurmdParameters=config_overrides\n"
        else:
            node_line = f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={real_cpus} " + " ".join(
                f"{k}={hw[k]}" for k in node_fields if k in hw
            )
            overrides = ""
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        conf = f"""\
# Written by tests/slurm/slurm_cluster.py; see its docstring for why each line is here.
ClusterName=scopetest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={self.state_dir}
SlurmdSpoolDir={self.spool_dir}/%n
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
SlurmctldDebug={self.debug}
SlurmdDebug={self.debug}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_path}
MinJobAge=3600
JobRequeue=1
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
{overrides}{node_line} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
        self.conf_path.write_text(conf)

    def _jobcomp_info(self, job_id: int) -> dict[str, str]:
        found: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for line in self.jobcomp_path.read_text(errors="replace").splitlines():
                info = parse_kv_line(line)
                if info.get("JobId") == str(job_id):
                    found = info  # the last record wins (a requeued job has one per run)
        return found

    def _kill_orphan_stepds(self) -> None:
        """Last resort after slurmd is gone: SIGKILL what is left of this cluster's jobs.

        slurmstepd and job tasks setsid() away from slurmd, so they are not in its process group.
        They are found by the ``SLURM_CONF=<our conf>`` they inherited (slurmstepd from slurmd, tasks
        from sbatch) plus, for tasks, ``SLURM_JOB_ID``; never this process.
        """
        marker = f"SLURM_CONF={self.conf_path}".encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                environ = (pid_dir / "environ").read_bytes().split(b"\0")
                if marker not in environ:
                    continue
                is_stepd = (pid_dir / "comm").read_text().strip() == "slurmstepd"
                if is_stepd or any(e.startswith(b"SLURM_JOB_ID=") for e in environ):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a throw-away single-node Slurm cluster until Ctrl-C or SIGTERM."
    )
    parser.add_argument("--cpus", type=int, default=None, help="advertise this many CPUs (config_overrides)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory afterwards")
    args = parser.parse_args(argv)
    stop_requested = []

    def request_stop(signum, frame):  # explicit handlers: a background job starts with SIGINT ignored
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    cluster = SlurmCluster(cpus=args.cpus, keep_tmpdir=args.keep)
    t0 = time.monotonic()
    try:
        cluster.start()
        print(f"cluster up in {time.monotonic() - t0:.1f} s; pids {cluster.pids}", flush=True)
        print(f"export SLURM_CONF={cluster.conf_path}", flush=True)
        while not stop_requested:
            signal.pause()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
