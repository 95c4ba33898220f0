"""How a run stands, from its files (pretrain/monitor/status.py): every case, without a run."""

from __future__ import annotations

import socket

from pretrain.core.run_dir import ProcessInfo
from pretrain.monitor.status import RunFiles, format_duration, run_status, status_is_latest

NOW = 1_000_000.0
HERE = ProcessInfo(socket.gethostname(), 4242, NOW - 600)
ELSEWHERE = ProcessInfo("compute-node-17", 4242, NOW - 600)


def files(**overrides: object) -> RunFiles:
    base: dict[str, object] = {
        "status": None,
        "status_is_latest": False,
        "process": ELSEWHERE,
        "last_activity": NOW - 5,
        "has_steps": True,
        "typical_interval_s": 2.0,
    }
    return RunFiles(**{**base, **overrides})  # type: ignore[arg-type]


def ended(state: str, reason: str = "", requeue: bool = False) -> dict[str, object]:
    return {"state": state, "reason": reason, "requeue": requeue, "step": 3, "max_steps": 6}


def test_how_the_latest_invocation_ended() -> None:
    assert run_status(files(status=ended("finished"), status_is_latest=True), NOW, 60).state == "finished"
    preempted = run_status(files(status=ended("stopped", "received SIGUSR1", True), status_is_latest=True), NOW, 60)
    assert preempted.state == "preempted" and "received SIGUSR1" in preempted.detail
    stopped = run_status(files(status=ended("stopped", "received SIGTERM"), status_is_latest=True), NOW, 60)
    assert (stopped.state, stopped.detail) == ("stopped", "received SIGTERM")
    failed = run_status(files(status=ended("failed", "5 non-finite losses"), status_is_latest=True), NOW, 60)
    assert (failed.state, failed.detail) == ("failed", "5 non-finite losses")


def test_an_earlier_invocations_status_does_not_hide_a_running_or_dead_one() -> None:
    # A resumed run: status.json says the previous invocation was preempted, the new one is training.
    assert run_status(files(status=ended("stopped", requeue=True)), NOW, 60).state == "running"
    # On this machine, the process that started the latest invocation is gone: killed or crashed.
    dead = run_status(files(process=HERE), NOW, 60, alive=lambda p: False)
    assert dead.state == "failed" and "ended without writing status.json" in dead.detail
    assert run_status(files(process=HERE), NOW, 60, alive=lambda p: True).state == "running"


def test_no_new_step_for_a_while_is_stalled_with_the_runs_own_pace_as_the_floor() -> None:
    quiet = files(last_activity=NOW - 120)
    stalled = run_status(quiet, NOW, stall_after_s=60, alive=lambda p: None)
    assert stalled.state == "stalled" and "no new step for 2 min" in stalled.detail
    # A run that logs every 5 minutes is not stalled after 2 minutes of quiet.
    assert run_status(files(last_activity=NOW - 120, typical_interval_s=300.0), NOW, 60).state == "running"
    # Alive but silent (hung in a collective) is stalled too.
    assert run_status(quiet, NOW, 60, alive=lambda p: True).state == "stalled"
    assert run_status(files(has_steps=False), NOW, 60).state == "starting"
    assert "sign of life" in run_status(files(has_steps=False, last_activity=NOW - 999), NOW, 60).detail


def test_which_status_file_belongs_to_the_latest_invocation() -> None:
    mine = {**ended("finished"), "host": HERE.host, "pid": HERE.pid}
    assert status_is_latest(mine, NOW, HERE, NOW - 1)
    assert not status_is_latest({**mine, "pid": 1}, NOW, HERE, NOW - 1)  # the previous invocation's
    # Files of older versions (no pid in status.json): the newer file wins.
    assert status_is_latest(ended("finished"), NOW, HERE, NOW - 1)
    assert not status_is_latest(ended("finished"), NOW - 2, HERE, NOW - 1)
    assert status_is_latest(ended("finished"), NOW, None, None)  # no process.json at all
    assert not status_is_latest(None, None, HERE, NOW)


def test_durations_read_naturally() -> None:
    assert [format_duration(s) for s in (5, 120, 7200, 3 * 86400)] == ["5 s", "2 min", "2.0 h", "3.0 days"]


def test_mfu_peaks_are_known_for_common_gpus_only() -> None:
    from pretrain.core.callbacks.throughput import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp32") == 66.9e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on V100: no MFU rather than a wrong one
    assert peak_flops("Some Future GPU", "bf16") is None
