"""A real one-node Slurm cluster on loopback for the tests that submit jobs (tests/launch/, tests/data_prep/):
MUNGE, slurmctld and slurmd from Debian's packages (.ci/deps/slurm.sh installs them), started as root with a
config written to a temporary directory, once per test session (tests/conftest.py registers the fixture).

Nothing is shared with a system-wide Slurm or MUNGE: own key, socket, ports, state and spool directories.
A cluster that cannot start fails the tests that need it, with the reason and the daemons' logs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.net import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def _program(name: str) -> str | None:
    sbin = f"/usr/sbin/{name}"  # daemons live in sbin, which a non-login PATH may lack
    return shutil.which(name) or (sbin if os.access(sbin, os.X_OK) else None)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and the jobs, which inherit it): this cluster's config."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {done.stderr}{self.logs()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); finished jobs stay for MinJobAge."""
        line = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for(self, job_id: str, what: str, ready: Callable[[dict[str, str]], bool], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if ready(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: timed out waiting for {what}; now {job}{self.logs()}")
            time.sleep(0.5)

    def wait_until_done(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
        return self.wait_for(job_id, "its end", lambda job: job.get("JobState") in ended, timeout)

    def node_state(self) -> str:
        return self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.strip()

    def logs(self) -> str:
        tails = []
        for log in sorted((self.root / "log").glob("*")):
            tails.append(f"\n--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        return "".join(tails)

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _slurm_conf(root: Path, host: str, node_line: str) -> str:
    ctld_port, slurmd_port = free_port(), free_port()
    return f"""\
ClusterName=launchtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# No cgroups (a container has none to give): processes are tracked through their parents.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
KillWait=10
# Finished jobs stay visible to `scontrol show job` for the tests.
MinJobAge=900
InactiveLimit=0
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    missing = [name for name in (*DAEMONS, *CLIENTS, "munge") if _program(name) is None]
    if missing:
        pytest.fail(f"cannot start Slurm: {', '.join(missing)} not installed; run .ci/deps/slurm.sh (make system-deps)")
    if os.geteuid() != 0:
        pytest.fail("cannot start Slurm: slurmd must run as root to start jobs; run the launch tests as root")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o711)  # munged wants its socket's directory searchable, its key private
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    # The node as slurmd sees this machine (CPUs, sockets, memory); slurmd knows itself by the short hostname.
    probe = subprocess.run([_program("slurmd") or "slurmd", "-C"], capture_output=True, text=True, check=False)
    node_line = next((line for line in probe.stdout.splitlines() if line.startswith("NodeName=")), "")
    if not node_line:
        pytest.fail(f"cannot start Slurm: `slurmd -C` printed no node line: {probe.stdout}{probe.stderr}")
    host = node_line.split()[0].removeprefix("NodeName=")
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, node_line), encoding="utf-8")
    cluster = SlurmCluster(root, conf)

    def start(*command: str, log: str) -> None:
        with open(root / "log" / log, "wb") as out:
            cluster.processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cluster.env))

    try:
        start(
            "munged",
            "--foreground",
            "--force",  # as root, in a private directory
            f"--socket={root}/munge/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root}/munge/munged.pid",
            f"--seed-file={root}/munge/munged.seed",
            f"--log-file={root}/log/munged.log",
            log="munged.out",
        )
        _wait(lambda: (root / "munge" / "munge.socket").exists(), 20, "munged's socket", cluster)
        start("slurmctld", "-D", "-f", str(conf), log="slurmctld.out")
        start("slurmd", "-D", "-f", str(conf), log="slurmd.out")

        _wait(lambda: cluster.node_state() == "idle", 60, "the node to be idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


def _wait(ready: Callable[[], bool], timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        exited = [p.args[0] for p in cluster.processes if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            cluster.stop()
            reason = f"{', '.join(map(str, exited))} exited" if exited else f"timed out after {timeout} s"
            pytest.fail(f"cannot start Slurm: waiting for {what}: {reason}{cluster.logs()}")
        time.sleep(0.3)
