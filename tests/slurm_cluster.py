"""A real one-node SLURM cluster (munged + slurmctld + slurmd) in a temporary directory.

Everything the daemons write (config, munge key and socket, state, spool, logs, pid files) lives under
one directory, and they listen on free ports with their own munge socket, so the cluster neither needs
nor disturbs a system-wide SLURM or munge. Fake GPUs are character devices (major 1, minor 3, like
/dev/null) listed in gres.conf: slurmd only needs files it can stat to count and hand out GPUs.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the cluster (not root, packages not installable, no mknod)."""


def ensure_installed() -> None:
    """Install the Debian packages when a binary is missing (root only)."""
    if all(shutil.which(name) for name in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"SLURM/munge not installed and not root to apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # other processes on the machine may hold the dpkg lock
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {(result.stderr or result.stdout)[-2000:]}")
    missing = [name for name in BINARIES if not shutil.which(name)]
    if missing:
        raise ClusterUnavailable(f"installed {' '.join(PACKAGES)} but still missing {missing}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """Handle on a running cluster: `env` carries SLURM_CONF for every client command."""

    def __init__(self, root: Path, node: str):
        self.root, self.node = root, node
        self.conf = root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    def cmd(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, squeue, ...) against this cluster."""
        return subprocess.run(args, env={**self.env, **(env or {})}, cwd=cwd, check=check,
                              capture_output=True, text=True, timeout=60)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
        """Submit and return the job id."""
        return self.cmd("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the controller has forgotten the job)."""
        result = self.cmd("scontrol", "show", "job", "-o", job_id, check=False)
        fields = {}
        for token in result.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until `squeue` no longer lists the job (requeues included); return its final record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.cmd("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
                return self.job(job_id)
            time.sleep(0.5)
        state = self.job(job_id)
        self.cmd("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still queued after {timeout:.0f}s: {state}\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        """Tail of the daemon logs, for failure messages."""
        out = []
        for log in sorted((self.root / "log").iterdir()):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def _spawn(self, name: str, args: list[str], user: str | None = None) -> None:
        # Foreground (-D/-F) children, switched to `user` by Popen itself (no runuser in between):
        # the pid we hold is the daemon's, so we can always stop and reap it. Own session: a Ctrl-C
        # meant for pytest reaches them only through teardown.
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, user=user, group=user,
                                            extra_groups=[] if user else None)
        log.close()

    def _wait_until(self, what: str, ready, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def start(self) -> None:
        munge_dir = self.root / "munge"
        key, sock = munge_dir / "munge.key", munge_dir / "munge.socket"
        self._spawn("munged", ["munged", "-F", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"], user="munge")
        self._wait_until("munged", sock.exists)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait_until("slurmctld", lambda: self.cmd("scontrol", "ping", check=False).returncode == 0)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_until("node idle", lambda: self.cmd("sinfo", "-h", "-n", self.node, "-o", "%T",
                                                       check=False).stdout.strip() == "idle")

    def stop(self) -> None:
        """Cancel leftover jobs (a failed test's), then stop the daemons (slurmd first) by pid and reap them."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cmd("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 15
            while self.cmd("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _write_config(root: Path, node: str, gpus: int) -> None:
    cpus = os.cpu_count() or 1
    for sub in ("etc", "log", "state", "spool", "gpus"):
        (root / sub).mkdir()
    for index in range(gpus):
        device = root / "gpus" / f"nvidia{index}"
        try:
            os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as exc:
            raise ClusterUnavailable(f"cannot mknod a fake GPU ({exc})") from exc
    (root / "etc" / "gres.conf").write_text(
        f"NodeName={node} Name=gpu File={root / 'gpus'}/nvidia[0-{gpus - 1}]\n")
    log = root / "log"
    (root / "etc" / "slurm.conf").write_text(f"""\
ClusterName=litegpt-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Own munge socket; a short credential lifetime, because a requeued job waits that long before it restarts.
AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire=10
CryptoType=crypto/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SchedulerType=sched/builtin
# Retry pending jobs every second (default 60 s), so a requeued job starts once its begin time passes.
SchedulerParameters=sched_interval=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    munge_dir = root / "munge"
    munge_dir.mkdir()
    munge_dir.chmod(0o711)  # munged insists that every client can reach its socket
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    shutil.chown(munge_dir, "munge", "munge")
    shutil.chown(key, "munge", "munge")


@contextmanager
def slurm_cluster(gpus: int = 2) -> Iterator[SlurmCluster]:
    """Install when needed, start the daemons, yield the cluster, always stop them and remove the files."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmctld/slurmd/munged must run as root here (not root)")
    ensure_installed()
    node = socket.gethostname().split(".")[0]  # `hostname -s`, as a real cluster names its nodes
    # mkdtemp is 0700; munged runs as the munge user and must traverse it to reach its own directory.
    root = Path(tempfile.mkdtemp(prefix="litegpt-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root, node)
    try:
        _write_config(root, node, gpus)
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
