"""A single-node Slurm for the tests, from Debian's `slurm-wlm` and `munge`, started and
stopped by the test that uses it (tests/test_slurm.py).

Everything it runs is its own: a munge key and socket, a `slurm.conf` (named to every
client through $SLURM_CONF, so that no configuration of the machine is read or written),
state and spool directories under one folder, and free TCP ports; with a MariaDB (or
MySQL) server reachable, a `slurmdbd` on a database of its own, so that `sacct` answers.
Each daemon runs in the foreground as a child of the test and is stopped by its PID.

The settings a single node needs (found by trying): `ProctrackType=proctrack/linuxproc`
and `TaskPlugin=task/none` (no cgroups in a container), `SelectType=select/cons_tres`,
`JobRequeue=1`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
MARIADB = ("127.0.0.1", 3306)


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def unavailable() -> str | None:
    """Why no test cluster can start here (the reason to skip), or None."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing; as root: apt-get "
                "install slurm-wlm munge slurmdbd)")
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root (slurmd starts jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return False
    return True


class SlurmCluster:
    """One node (this host, `cpus` CPUs, `memory_mb` of memory) in one partition `test`,
    its daemons' files under `root`. Use as a context manager: the daemons start on
    entry and are stopped, by PID, on exit."""

    def __init__(self, root: Path, *, cpus: int = 2, memory_mb: int = 4000,
                 accounting: bool = True):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.cpus, self.memory_mb = cpus, memory_mb
        # sacct needs slurmdbd, and slurmdbd a MariaDB/MySQL server.
        self.accounting = accounting and _which("slurmdbd") is not None and \
            _reachable(MARIADB)
        self.database = f"mtbert_slurm_{uuid.uuid4().hex[:10]}"
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ files

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged checks the permissions of its key and socket directories.
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ports = {"ctld": _free_port(), "slurmd": _free_port(), "dbd": _free_port()}
        log = self.root / "log"
        lines = [
            "ClusterName=mtbert-test",
            f"SlurmctldHost={self.node}",
            f"SlurmctldPort={ports['ctld']}",
            f"SlurmdPort={ports['slurmd']}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={log / 'slurmctld.log'}",
            f"SlurmdLogFile={log / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "JobRequeue=1",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "KillWait=15",
            "MinJobAge=600",
            "InactiveLimit=0",
            "PlugStackConfig=/dev/null",
            f"NodeName={self.node} NodeHostname={self.node} NodeAddr=127.0.0.1 "
            f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        if self.accounting:
            lines += ["AccountingStorageType=accounting_storage/slurmdbd",
                      f"AccountingStorageHost={self.node}",
                      f"AccountingStoragePort={ports['dbd']}",
                      # The munge socket of the controller's connection to slurmdbd.
                      f"AccountingStoragePass={self.munge_socket}"]
            dbd = self.root / "slurmdbd.conf"
            dbd.write_text("\n".join([
                "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
                f"DbdHost={self.node}", f"DbdPort={ports['dbd']}", "SlurmUser=root",
                f"PidFile={self.root / 'slurmdbd.pid'}", f"LogFile={log / 'slurmdbd.log'}",
                "StorageType=accounting_storage/mysql", f"StorageHost={MARIADB[0]}",
                f"StoragePort={MARIADB[1]}", "StorageUser=root",
                f"StorageLoc={self.database}", ""]))
            dbd.chmod(0o600)  # slurmdbd refuses a configuration others can read
        self.conf.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------ daemons

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client command (sbatch, scontrol, sacct) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _start(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        out.close()

    def _wait(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                       f"{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test Slurm: no {what} after {timeout:.0f} s; "
                                   f"{self.log_tail('slurmctld')}")
            time.sleep(0.5)

    def log_tail(self, name: str, lines: int = 15) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts)

    def start(self) -> None:
        self._write_files()
        self._start("munged", [_which("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}",
                               f"--key-file={self.root / 'munge' / 'munge.key'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait("munge socket", self.munge_socket.exists, timeout=20)
        if self.accounting:
            # slurmdbd reads the slurmdbd.conf beside $SLURM_CONF.
            self._start("slurmdbd", [_which("slurmdbd"), "-D"])
            self._wait("slurmdbd", lambda: " started" in self.log_tail("slurmdbd", 50),
                       timeout=60)
            self.client("sacctmgr", "-i", "add", "cluster", "mtbert-test", check=False)
        self._start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("controller", lambda: self.client("scontrol", "ping",
                                                     check=False).returncode == 0)
        self._start("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf),
                               "-N", self.node])
        self._wait("idle node", lambda: "State=IDLE" in self.client(
            "scontrol", "show", "node", self.node, check=False).stdout)

    def stop(self) -> None:
        """Cancel the jobs left (a test that failed half-way), then stop every daemon this
        cluster started, by PID, the last started first: SIGTERM, then SIGKILL after 20 s."""
        if "slurmd" in self.procs and self.procs["slurmctld"].poll() is None:
            self._cancel_jobs()
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self.accounting:
            self._drop_database()

    def _cancel_jobs(self, timeout: float = 60) -> None:
        """Cancel every job of this cluster and wait for their processes to end (a job's
        processes outlive slurmd)."""
        listed = self.client("squeue", "-h", "-o", "%A", check=False)
        jobs = listed.stdout.split()
        if not jobs:
            return
        self.client("scancel", *jobs, check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and \
                self.client("squeue", "-h", "-o", "%A", check=False).stdout.strip():
            time.sleep(1)

    def _drop_database(self) -> None:
        mysql = _which("mariadb") or _which("mysql")
        if mysql:
            subprocess.run([mysql, "-h", MARIADB[0], "-P", str(MARIADB[1]), "-u", "root",
                            "-e", f"DROP DATABASE IF EXISTS `{self.database}`"],
                           capture_output=True, timeout=30)

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ clients

    def client(self, name: str, *args: str, check: bool = True, env: dict | None = None,
               cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command (sbatch, scontrol, sacct, ...) against this cluster; `env` on top
        of this process's environment."""
        done = subprocess.run([_which(name) or name, *args], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)}: exit {done.returncode}: "
                               f"{done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job JOB_ID` as KEY -> VALUE (the first record)."""
        text = self.client("scontrol", "-o", "show", "job", job_id).stdout
        first = text.splitlines()[0] if text.strip() else ""
        return dict(part.split("=", 1) for part in first.split() if "=" in part)
