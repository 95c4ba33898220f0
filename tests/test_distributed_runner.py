"""tests/distributed_runner.py: ranks forked from a warm server behave as torchrun's ranks do.

The rank program is tests/rank_probe.py (it records what its launcher gave it and fails in the ways asked for);
one test runs it under the real torchrun too and compares. The training tests (tests/pretrain/) then cover real
DeepSpeed engines, Hydra's exit codes and fault injection through the same runner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed_runner import FAILURE_GRACE_S
from tests.support import REPO, run_distributed


def views(out: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(out.glob("view-rank*.json"))]


def alive(out: Path) -> list[int]:
    """The probe ranks whose process still exists."""
    pids = [int(path.read_text()) for path in out.glob("pid-rank*")]
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_ranks_see_what_torchrun_gives_its_ranks(tmp_path: Path) -> None:
    forked, real = tmp_path / "forked", tmp_path / "torchrun"
    for out, launcher in ((forked, "fork"), (real, "torchrun")):
        out.mkdir()
        done = run_distributed(2, "tests.rank_probe", str(out), env={"RANK_PROBE_CALLER": "yes"}, launcher=launcher)
        assert sorted(done.stdout.splitlines()) == sorted(
            f"rank {rank} {what}" for rank in (0, 1) for what in ("says hello", "writes to fd 1")
        )
    got, expected = views(forked), views(real)
    assert [view.pop("forked_from_server") for view in got] == [True, True]
    assert [view.pop("forked_from_server") for view in expected] == [False, False]
    for view in (*got, *expected):
        view["env"].pop("MASTER_ADDR")  # torchrun --standalone says localhost, the fork runner 127.0.0.1
        view["argv"][0] = "<out>"
    assert got == expected
    assert got[1]["env"] == {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "RANK_PROBE_CALLER": "yes",
    }
    assert got[0]["pretrain"] == str(REPO / "pretrain" / "__init__.py") and got[0]["cwd"] == str(REPO)


def test_output_comes_rank_by_rank_and_the_process_exits_as_python_does(tmp_path: Path) -> None:
    done = run_distributed(2, "tests.rank_probe", str(tmp_path), "collective", "atexit")
    assert done.returncode == 0
    # Python-level prints, fd-level writes, a non-daemon thread joined and an exit handler run at exit, in order.
    assert done.stdout.splitlines() == [
        line
        for rank in (0, 1)
        for line in (
            f"rank {rank} says hello",
            f"rank {rank} writes to fd 1",
            f"rank {rank} all-reduced 2",
            f"rank {rank} thread finished",
            f"rank {rank} exit handler ran",
        )
    ]
    assert done.stderr.splitlines() == ["rank 0 complains", "rank 1 complains"]


@pytest.mark.parametrize(
    ("action", "code", "in_stderr"),
    [
        ("exit:1:3", 3, "run_ranks: rank 1 failed first, exit code 3"),
        ("raise:0", 1, "RuntimeError: rank 0 fails on purpose"),
        ("kill:1", -signal.SIGKILL, "rank 1 failed first, exit code -9"),
    ],
)
def test_the_exit_code_is_the_failed_ranks(action: str, code: int, in_stderr: str, tmp_path: Path) -> None:
    done = run_distributed(2, "tests.rank_probe", str(tmp_path), action, check=False)
    assert done.returncode == code
    assert in_stderr in done.stderr
    if action.startswith("raise"):
        assert "Traceback (most recent call last)" in done.stderr


def test_a_user_error_exits_2_through_hydra(tmp_path: Path) -> None:
    done = run_distributed(2, "pretrain", f"data_dir={tmp_path / 'missing'}", f"run_dir={tmp_path}", check=False)
    assert done.returncode == 2
    assert done.stderr.count("error: ") == 2  # one line per rank, as under torchrun
    assert "Traceback" not in done.stderr


def test_a_failed_rank_stops_the_others(tmp_path: Path) -> None:
    """Rank 0 would sleep for an hour; rank 1 fails, so rank 0 gets SIGTERM after the grace period."""
    start = time.monotonic()
    done = run_distributed(2, "tests.rank_probe", str(tmp_path), "sleep:0", "exit:1:4", check=False)
    assert done.returncode == 4
    assert time.monotonic() - start < FAILURE_GRACE_S + 30
    assert alive(tmp_path) == []


def test_the_timeout_kills_every_rank_and_raises(tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        run_distributed(2, "tests.rank_probe", str(tmp_path), "sleep:0", "sleep:1", timeout=10)
    stdout, stderr = raised.value.stdout, raised.value.stderr
    assert isinstance(stdout, str) and isinstance(stderr, str)  # text, as subprocess.run(text=True) gives
    assert "rank 0 says hello" in stdout and "rank 1 complains" in stderr
    assert alive(tmp_path) == []


def test_the_server_imports_this_checkout_whatever_the_cwd(tmp_path: Path) -> None:
    """Python 3.11's fork server ignores the parent's sys.path: started from another directory it would import
    the project from wherever the editable install points. Here a fresh process, in another cwd, starts one."""
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.support import run_distributed\n"
        f"run_distributed(2, 'tests.rank_probe', {str(tmp_path)!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for view in views(tmp_path):
        assert view["forked_from_server"] and view["pretrain"] == str(REPO / "pretrain" / "__init__.py"), view
        assert view["path0"] == str(REPO) and view["cwd"] == str(REPO)
