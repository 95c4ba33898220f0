"""`launcher=slurm`: an sbatch script written from the config, submitted (or printed with launch.dry_run=true).

Inside the job, srun starts one torchrun per node; they meet through a c10d rendezvous on the allocation's
first node, on a port derived from the job id. Stopping and requeueing:

1. `--signal=USR1@<launcher.signal_lead_s>`: Slurm signals every process of the job's steps (not the batch
   shell) that long before the time limit; `scancel --signal=USR1 JOBID` does the same at any time.
   torchrun passes SIGUSR1 on to the ranks (rendezvous.py), DataLoader workers ignore it (pretrain/data.py),
   the ranks finish their step, checkpoint and exit 0, and the main rank writes RUN/status.json.
2. Should a signal reach the batch shell instead (`--signal=B:...`, `scancel --batch` or `--full`), the
   shell passes it on to srun, which passes it on to the step: the same stop either way.
3. After srun, `python -m launch.status` reads RUN/status.json (launch/status.py says what requeues) and
   the script runs `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue under the same id and
   the same command resumes from the latest checkpoint. The log is opened in append mode, so it tells the
   whole story across requeues.
4. A failed node is handled as a preemption is: its torchrun ends, `srun --kill-on-bad-exit` stops the other
   nodes' (whose ranks have reported the lost peer), the run ends without a verdict, and the job requeues
   itself (launcher.requeue_failures times in a row at most without a new checkpoint); Slurm allocates the
   requeued job healthy nodes. (A failure of the node running this script is Slurm's: with --requeue, Slurm
   requeues the job itself.)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from common.errors import UserError
from launch.config import LaunchConfig, SlurmLauncherConfig
from launch.rendezvous import Rendezvous, torchrun_command
from pretrain.core.run_dir import RunDir

# Shell expressions the script defines before srun; left unquoted in the torchrun command line.
_ENDPOINT = "$head_node:$rdzv_port"
_RUN_ID = "$SLURM_JOB_ID"


def log_path(config: LaunchConfig) -> str:
    launcher: SlurmLauncherConfig = config.launcher
    return launcher.output or RunDir(config.run_dir).slurm_log_pattern()


def sbatch_options(config: LaunchConfig) -> list[tuple[str, str]]:
    """(option, why) for every #SBATCH line, in order."""
    launcher: SlurmLauncherConfig = config.launcher
    ranks = launcher.tasks_per_node
    options = [
        (f"--job-name={launcher.job_name}", ""),
        (f"--nodes={launcher.nodes}", ""),
        ("--ntasks-per-node=1", f"one torchrun per node, which starts the node's {ranks} ranks"),
        (
            f"--cpus-per-task={ranks * launcher.cpus_per_task}",
            f"{ranks} ranks x {launcher.cpus_per_task} CPUs (launcher.cpus_per_task)",
        ),
    ]
    if launcher.gpus_per_node:
        options.append((f"--gpus-per-node={launcher.gpus_per_node}", "one rank per GPU"))
    for key in ("mem", "time", "partition", "account", "qos", "constraint"):
        value = getattr(launcher, key)
        if value is not None:
            options.append((f"--{key}={value}", ""))
    options.append((f"--output={log_path(config)}", ""))
    if launcher.error is not None:
        options.append((f"--error={launcher.error}", ""))
    options += [
        ("--open-mode=append", "a requeued job appends to the same log"),
        (
            f"--signal=USR1@{launcher.signal_lead_s}",
            "the ranks checkpoint and stop this many seconds before the time limit",
        ),
        ("--requeue" if launcher.requeue else "--no-requeue", ""),
        (f"--chdir={Path.cwd()}", "relative paths in the run's config mean what they meant at submission"),
    ]
    options += [(line, "launcher.extra_sbatch") for line in launcher.extra_sbatch]
    return options


def render_script(config: LaunchConfig, args: list[str]) -> str:
    """The whole sbatch script for this config; `args` are the training overrides every rank receives."""
    launcher: SlurmLauncherConfig = config.launcher
    python = launcher.python or sys.executable
    run_dir = Path(config.run_dir).absolute()
    rendezvous = Rendezvous(
        nnodes=launcher.nodes,
        nproc_per_node=launcher.tasks_per_node,
        endpoint=_ENDPOINT,
        run_id=_RUN_ID,
        # torchrun's own test (does the endpoint name this machine?) is right here: one torchrun per node.
        is_host=None,
        # As long as Slurm waits between the signal and the time limit.
        stop_timeout_s=max(launcher.signal_lead_s, 30),
    )
    shell_expressions = {f"--rdzv_endpoint={_ENDPOINT}", f"--rdzv_id={_RUN_ID}"}
    words = [
        word if word in shell_expressions else shlex.quote(word)
        for word in torchrun_command(python, rendezvous, config.launch.module, args)
    ]
    # One option or override per line: `python -m launch.torchrun`, its options, `-m module`, overrides.
    module_at = len(words) - len(args) - 2
    torchrun = [
        " ".join(words[:3]),
        *words[3:module_at],
        " ".join(words[module_at : module_at + 2]),
        *args_quoted(args),
    ]
    port = str(launcher.rdzv_port) if launcher.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))"
    max_requeues = launcher.max_requeues if launcher.requeue else 0
    requeue_failures = launcher.requeue_failures if launcher.requeue else 0
    lines = [
        "#!/bin/bash",
        f"# Written by `python -m launch launcher=slurm` for the run in {run_dir}.",
    ]
    for option, why in sbatch_options(config):
        lines.append(f"#SBATCH {option}" + (f"  # {why}" if why else ""))
    if launcher.setup:  # before `set -u`: environment scripts (conda, modules) often read unset variables
        lines += ["", "# launcher.setup", *launcher.setup]
    lines += ["", "set -uo pipefail  # not -e: the end of the run decides what happens next"]
    lines += [
        "",
        f"run_dir={shlex.quote(str(run_dir))}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"rdzv_port={port}",
        'echo "job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, on $SLURM_JOB_NODELIST;'
        ' rendezvous at $head_node:$rdzv_port"',
        "# status.json tells how the last invocation ended; the previous one's must not be taken for this one's.",
        f"rm -f {shlex.quote(str(RunDir(run_dir).status_file))}",
        "",
        # The CPUs are explicit: srun does not take the job's --cpus-per-task over in every Slurm version.
        f"srun --ntasks-per-node=1 --cpus-per-task={launcher.tasks_per_node * launcher.cpus_per_task}"
        " --kill-on-bad-exit=1 \\",
        "    " + " \\\n    ".join(torchrun) + " &",
        "srun_pid=$!",
        "# Slurm signals the job's steps, not this shell; a signal that reaches this shell anyway is passed on.",
        "trap 'kill -USR1 $srun_pid 2>/dev/null' USR1",
        "trap 'kill -TERM $srun_pid 2>/dev/null' TERM",
        "trap 'kill -INT $srun_pid 2>/dev/null' INT",
        "wait $srun_pid; code=$?",
        "while kill -0 $srun_pid 2>/dev/null; do wait $srun_pid; code=$?; done  # wait again after a trap",
        "",
        f'verdict=$({shlex.quote(python)} -m launch.status "$run_dir" --restarts "${{SLURM_RESTART_COUNT:-0}}"'
        f" --max-requeues {max_requeues} --requeue-failures {requeue_failures} --exit-code $code)",
        'case "$verdict" in',
        '    requeue) scontrol requeue "$SLURM_JOB_ID"; exit 0 ;;',
        "    finished | stopped) exit 0 ;;",
        '    *) [ "$code" -ne 0 ] && exit "$code"; exit 1 ;;',
        "esac",
        "",
    ]
    return "\n".join(lines)


def args_quoted(args: list[str]) -> list[str]:
    return [shlex.quote(arg) for arg in args]


def submit(config: LaunchConfig, args: list[str]) -> int:
    script = render_script(config, args)
    if config.launch.dry_run:
        print(script, end="", flush=True)
        return 0
    run_dir = Path(config.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(log_path(config)).parent
    if "%" not in str(log_dir):  # Slurm does not create the log's directory, and fails the job without it
        log_dir.mkdir(parents=True, exist_ok=True)
    script_path = RunDir(run_dir).slurm_script
    script_path.write_text(script, encoding="utf-8")
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, env=os.environ, check=False
        )
    except FileNotFoundError as error:
        raise UserError("sbatch not found: submit from a Slurm login node, or use launcher=local") from error
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        raise UserError(f"sbatch refused {script_path}: {message}")
    job_id = done.stdout.strip().split(";")[0]
    log = re.sub(r"%j|%A", job_id, log_path(config)).replace("%x", config.launcher.job_name)
    print(f"submitted job {job_id}: log {log}, run {run_dir}, script {script_path}", flush=True)
    return 0
