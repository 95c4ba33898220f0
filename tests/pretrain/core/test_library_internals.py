"""Pins what pretrain/core/library_internals.py relies on in other libraries' private names: an upgrade that
changes one fails the test named after it, not a training run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from pretrain.core import library_internals as internals
from tests.support import REPO


def test_pipeline_grid_and_local_layer_range_of_a_deepspeed_pipeline_module() -> None:
    # A PipelineModule needs a process group.
    script = textwrap.dedent(
        """
        import deepspeed, torch
        from deepspeed.pipe import LayerSpec, PipelineModule
        from pretrain.core import library_internals as internals
        internals.skip_shared_memory_comm_op()  # as every rank does (distributed.init_distributed)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        module = PipelineModule(layers=[LayerSpec(torch.nn.Linear, 4, 4) for _ in range(3)], num_stages=1)
        grid = internals.pipeline_grid(module)
        assert grid.get_data_parallel_world_size() == 1 and grid.get_pipe_parallel_world_size() == 1, grid
        assert internals.local_layer_range(module) == range(0, 3), internals.local_layer_range(module)
        assert internals.pipeline_grid(torch.nn.Linear(2, 2)) is None
        print("ok")
        """
    )
    done = _run_one_rank(script)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _run_one_rank(script: str) -> subprocess.CompletedProcess[str]:
    """A script on one gloo rank, in a child process so no process group outlives the test."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(__import__("common.net", fromlist=["free_port"]).free_port())
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)


def test_deepspeed_optimizer_internals_that_resuming_on_another_layout_reads_and_sets() -> None:
    script = textwrap.dedent(
        """
        import deepspeed, torch
        from deepspeed.pipe import LayerSpec, PipelineModule
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        from pretrain.core import library_internals as internals
        internals.skip_shared_memory_comm_op()  # as every rank does (distributed.init_distributed)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

        def engine(stage, precision, pipeline=False):
            torch.manual_seed(0)
            if pipeline:
                model = PipelineModule(layers=[LayerSpec(torch.nn.Linear, 4, 3)], num_stages=1, loss_fn=torch.nn.MSELoss())
            else:
                model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
            matrices = [p for p in model.parameters() if p.dim() == 2]
            vectors = [p for p in model.parameters() if p.dim() == 1]
            groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
            config = {"train_batch_size": 1, "zero_optimization": {"stage": stage},
                      "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True}
            built, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=0.1), config=config)
            if not pipeline:
                dtype = torch.bfloat16 if precision == "bf16" else torch.float32
                loss = built(torch.randn(2, 4, dtype=dtype)).float().square().sum()
                built.backward(loss)
                built.step()
            return built

        assert internals.optimizer_kind(engine(0, "fp32").optimizer) == "torch"

        unfused = engine(0, "bf16").optimizer
        assert internals.optimizer_kind(unfused) == "unfused"
        pairs = internals.unfused_masters(unfused)
        assert len(pairs) == 4 and all(l.dtype == torch.bfloat16 and m.dtype == torch.float32 for l, m in pairs)
        assert all(l.shape == m.shape and "exp_avg" in unfused.optimizer.state[m] for l, m in pairs)

        zero1 = engine(1, "fp32")
        assert internals.optimizer_kind(zero1.optimizer) == "fragments"
        flats = internals.master_partitions(zero1.optimizer)
        assert [group for _, group in flats] == [0, 1] and sum(f.numel() for f, _ in flats) >= 12 + 3 + 6
        internals.link_fragment_state(zero1.optimizer)  # without it, group 1's parameters have no state fragment
        bias = zero1.module[0].bias
        state = zero1.optimizer.optimizer.state[flats[1][0]]["exp_avg"]
        assert torch.equal(safe_get_full_optimizer_state(bias, "exp_avg"), state[: bias.numel()])

        zero3 = engine(3, "fp32")
        assert internals.optimizer_kind(zero3.optimizer) == "zero3"
        assert [group for _, group in internals.master_partitions(zero3.optimizer)] == [0, 1]
        weight = zero3.module[0].weight
        partition, rank, ranks = internals.zero3_partition(weight)
        assert (rank, ranks) == (0, 1) and partition.numel() == weight.ds_numel == 12
        assert torch.equal(partition.view(3, 4), safe_get_full_fp32_param(weight))

        bf16_pipe = engine(0, "bf16", pipeline=True).optimizer
        assert type(bf16_pipe).__name__ == "BF16_Optimizer" and internals.optimizer_kind(bf16_pipe) == "fragments"
        assert sum(f.numel() for f, _ in internals.master_partitions(bf16_pipe)) >= 15
        print("ok")
        """
    )
    done = _run_one_rank(script)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_wrapper_name_parts_are_what_torch_compile_and_checkpoint_wrapper_put_into_parameter_names() -> None:
    apply_checkpointing, wrapper, _ = internals.checkpoint_wrapper_tools()
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    apply_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: m is model[1])
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    names = [name for name, _ in compiled.named_parameters()]
    assert names[0] == "_orig_mod.0.weight" and names[2] == "_orig_mod.1._checkpoint_wrapped_module.weight"
    stripped = names[2]
    for part in internals.wrapper_name_parts():
        stripped = stripped.replace(part, "")
    assert stripped == "1.weight"


def test_shutdown_loader_workers_ends_the_worker_processes() -> None:
    import psutil

    # Other fixtures of the session (the Slurm cluster's daemons) are children too: count only new ones.
    before = {p.pid for p in psutil.Process().children()}
    loader = DataLoader(list(range(64)), batch_size=4, num_workers=2, persistent_workers=True)
    iterator = iter(loader)
    next(iterator)
    workers = [p for p in psutil.Process().children() if p.pid not in before and p.is_running()]
    assert len(workers) == 2
    internals.shutdown_loader_workers(iterator)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    internals.shutdown_loader_workers(object())  # anything without workers: nothing to do


def test_checkpoint_wrapper_recomputes_with_the_same_output_and_gradients() -> None:
    apply_checkpointing, wrapper, impl = internals.checkpoint_wrapper_tools()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    wrapped = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    wrapped.load_state_dict(plain.state_dict())
    apply_checkpointing(
        wrapped,
        checkpoint_wrapper_fn=lambda m: wrapper(m, checkpoint_impl=impl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, nn.Linear),
    )
    assert any(type(m).__name__ == "CheckpointWrapper" for m in wrapped.modules())
    x = torch.randn(4, 8)
    plain(x).square().sum().backward()
    wrapped(x).square().sum().backward()
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_codecarbon_countries_is_codecarbons_energy_mix_table() -> None:
    countries = internals.codecarbon_countries()
    assert {"USA", "FRA", "DEU"} <= countries and len(countries) > 100
    from codecarbon.input import DataSource

    assert countries == set(DataSource().get_global_energy_mix_data())


@pytest.mark.timeout(120)
def test_codecarbon_tracker_start_and_measure_now(tmp_path: Path) -> None:
    from codecarbon import OfflineEmissionsTracker, OutputMethod

    tracker = OfflineEmissionsTracker(
        country_iso_code="USA",
        output_dir=str(tmp_path),
        output_file="node-0.csv",
        output_methods=[OutputMethod.CSV],
        on_csv_write="update",
        api_call_interval=-1,
        measure_power_secs=15,
        tracking_mode="machine",
        log_level="error",
    )
    assert not internals.codecarbon_has_started(tracker)
    tracker.start()
    try:
        assert internals.codecarbon_has_started(tracker)
        sum(i * i for i in range(200_000))  # some work to measure
        data = internals.codecarbon_measure_now(tracker)
        for field in ("energy_consumed", "cpu_energy", "gpu_energy", "ram_energy", "emissions"):
            assert getattr(data, field) >= 0.0, field
        assert data.energy_consumed > 0.0
        assert (tmp_path / "node-0.csv").is_file()  # measuring now also writes the reading
    finally:
        tracker.stop()


def test_skip_shared_memory_comm_op_starts_deepspeed_without_building_or_locking(tmp_path: Path) -> None:
    """With the op skipped, a process group starts even when a stale JIT lock (left by a killed process) sits
    in the extensions directory, and nothing is built there; DeepSpeed's backend has no shm op."""
    stale = tmp_path / "extensions" / "py311_cpu" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").write_text("")
    script = textwrap.dedent(
        """
        import deepspeed, deepspeed.comm as ds_comm
        from pretrain.core import library_internals as internals
        internals.skip_shared_memory_comm_op()
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        assert ds_comm.comm.cdb.shm_comm_op is None
        print("ok")
        """
    )
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(__import__("common.net", fromlist=["free_port"]).free_port())
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert sorted(p.name for p in stale.iterdir()) == ["lock"]  # nothing built, the stale lock untouched


def test_checkpoint_writes_go_through_the_guard_and_load_with_weights_only(tmp_path: Path) -> None:
    """Every file a ZeRO save_checkpoint writes passes through guard_checkpoint_writes' hook (so a full disk can be
    handled on every rank alike), and weights_only_loads makes DeepSpeed's own torch.load calls (which pass
    weights_only=False) unpickle with weights_only=True, DeepSpeed's checkpoint classes allowlisted."""
    script = textwrap.dedent(
        f"""
        import argparse, pickle, torch, deepspeed
        from pathlib import Path
        from pretrain.core import library_internals as internals
        internals.skip_shared_memory_comm_op()
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        model = torch.nn.Linear(4, 4)
        config = {{"train_batch_size": 1, "zero_optimization": {{"stage": 1}}, "zero_allow_untested_optimizer": True}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
        engine.backward(engine(torch.ones(1, 4)).sum()); engine.step()
        written = []
        internals.guard_checkpoint_writes(engine, lambda write, path: (written.append(str(path)), write()))
        internals.guard_checkpoint_writes(engine, lambda write, path: 1 / 0)  # idempotent: not wrapped twice
        engine.save_checkpoint("{tmp_path}", tag="t", save_latest=False)
        files = [p for p in Path("{tmp_path}").rglob("*") if p.is_file()]
        assert len(files) == 4, files  # model states, optimizer shard, recovery scripts (beside the tag's folder)
        for path in files:
            assert any(str(path) == w or str(path).startswith(w.rstrip("/") + "/") for w in written), (path, written)
        optimizer = next(p for p in files if p.name.endswith("optim_states.pt"))
        try:
            torch.load(optimizer, weights_only=True)
            raise AssertionError("DeepSpeed's optimizer file needs no allowlist: deepspeed_checkpoint_globals is stale")
        except pickle.UnpicklingError:
            pass
        with internals.weights_only_loads():
            for path in files:
                if path.suffix == ".pt":
                    torch.load(path, map_location="cpu", weights_only=False)  # forced to weights_only=True
            torch.save(argparse.Namespace(code="would run"), "{tmp_path}/unsafe.pt")
            try:
                torch.load("{tmp_path}/unsafe.pt", weights_only=False)
                raise AssertionError("weights_only=False was honoured inside weights_only_loads")
            except pickle.UnpicklingError:
                pass
            assert engine.load_checkpoint("{tmp_path}", tag="t")[0] is not None
        print("ok")
        """
    )
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(__import__("common.net", fromlist=["free_port"]).free_port())
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


def test_bound_torchrun_exit_barrier_caps_the_agents_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.elastic.agent.server import api

    monkeypatch.setattr(api.SimpleElasticAgent, "_exit_barrier", api.SimpleElasticAgent._exit_barrier)  # undone after
    waits: list[float] = []
    monkeypatch.setattr(api.store_util, "barrier", lambda **kwargs: waits.append(kwargs["barrier_timeout"]))
    internals.bound_torchrun_exit_barrier(7)
    internals.bound_torchrun_exit_barrier(9)  # not wrapped twice
    group = SimpleNamespace(state="SUCCEEDED", group_world_size=2)
    agent = SimpleNamespace(_exit_barrier_timeout=300, _store=None, _worker_group=group, _in_exit_barrier=False)
    api.SimpleElasticAgent._exit_barrier(agent)  # type: ignore[arg-type]
    assert waits == [7]


def test_wandb_records_and_the_last_history_step_of_a_transaction_log(tmp_path: Path) -> None:
    # A real offline run, in a child process (wandb keeps global state), long enough to span several 32 KiB
    # blocks, so that reading from the end has to find a record's start inside a block.
    script = textwrap.dedent(
        f"""
        import wandb
        run = wandb.init(mode="offline", project="pin", id="pin12345", dir={str(tmp_path)!r},
                         settings=wandb.Settings(console="off", silent=True))
        for step in range(1, 301):
            run.log({{"step": step, "loss": 1.0 / step, "note": "x" * 200}}, step=step)
        run.finish()
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    (log,) = (tmp_path / "wandb").glob("offline-run-*-pin12345/run-pin12345.wandb")
    assert log.stat().st_size > 3 * 32768
    records = list(internals.wandb_records(log))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "run" or "run" in kinds[:3]
    history = [r for r in records if r.WhichOneof("record_type") == "history"]
    assert [r.history.step.num for r in history] == list(range(1, 301))
    assert {item.key or ".".join(item.nested_key) for item in history[0].history.item} >= {
        "_step",
        "step",
        "loss",
        "note",
    }
    assert internals.wandb_last_history_step(log) == 300
    # From any block on, the reader resynchronizes on the next record that starts there.
    tail = [r.history.step.num for r in internals.wandb_records(log, start=32768 + 5) if r.HasField("history")]
    assert tail == list(range(tail[0], 301)) and tail[0] > 1
    # A file cut in the middle of a record (a killed run) reads up to its last whole record.
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(log.read_bytes()[: log.stat().st_size // 2])
    steps = [r.history.step.num for r in internals.wandb_records(cut) if r.HasField("history")]
    assert steps == list(range(1, len(steps) + 1)) and 0 < len(steps) < 300
    assert internals.wandb_last_history_step(cut) == len(steps)


def test_skip_gradient_allreduce_drops_the_gradient_all_reduce_and_trains_the_same() -> None:
    """One gloo rank, ZeRO-0, 2 accumulation steps, fp32 and bf16: DeepSpeed all-reduces a flat buffer of every
    gradient at each accumulation boundary; with the switch off it does not, and the weights end the same."""
    script = textwrap.dedent(
        """
        import deepspeed, torch
        from torch.profiler import profile
        from pretrain.core import library_internals as internals
        internals.skip_shared_memory_comm_op()  # as every rank does (distributed.init_distributed)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

        def train(precision, skip):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
            initial = [p.detach().clone() for p in model.parameters()]
            config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                      "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": 0},
                      "steps_per_print": 10**9}
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            if skip:
                internals.skip_gradient_allreduce(engine)
            dtype = next(engine.module.parameters()).dtype
            inputs = torch.randn(6, 1, 8, generator=torch.Generator().manual_seed(1))
            with profile(record_shapes=True) as trace:
                for x in inputs:  # 6 micro-batches: 3 optimizer steps
                    loss = engine(x.to(dtype)).float().square().mean()
                    engine.backward(loss)
                    engine.step()
            numel = sum(p.numel() for p in initial)
            # Each all-reduce's input shapes: the gradient all-reduce is one flat buffer of every gradient.
            flat = [e for e in trace.events() if "all_reduce" in e.name and e.input_shapes == [[numel]]]
            weights = [p.detach().float() for p in engine.module.parameters()]
            assert all(not torch.equal(w, i.float()) for w, i in zip(weights, initial)), "did not train"
            return len(flat), weights

        for precision in ("fp32", "bf16"):
            reduced, expected = train(precision, skip=False)
            skipped, got = train(precision, skip=True)
            assert reduced == 3 and skipped == 0, (precision, reduced, skipped)
            assert all(torch.equal(a, b) for a, b in zip(expected, got)), precision
        print("ok")
        """
    )
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(__import__("common.net", fromlist=["free_port"]).free_port())
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_sentencepiece_flat_ids_are_encodes_ids_concatenated(tiny_dataset: Path) -> None:
    import numpy as np
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tiny_dataset / "tokenizer.model"))
    texts = ["It was the best of times,\n", "", "caf\u00e9 \u2014 na\u00efve \U0001f600\n", "\n", "zzz qq"]
    flat = internals.sentencepiece_flat_ids(processor, texts)
    assert flat is not None, "SentencePieceProcessor._processor._EncodeAsBufferBatch is gone"
    expected = [i for ids in processor.encode(texts, num_threads=1) for i in ids]
    assert flat.dtype == np.int32 and flat.tolist() == expected and len(expected) > 10
    between = internals.sentencepiece_flat_ids(processor, texts, [7, 8])
    joined = [i for n, ids in enumerate(processor.encode(texts, num_threads=1)) for i in ([7, 8] if n else []) + ids]
    assert between.tolist() == joined
