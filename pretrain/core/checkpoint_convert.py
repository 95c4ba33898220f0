"""Any checkpoint this project writes -> the portable checkpoint (portable.py), in one process, no engine.

Why our own conversion and not DeepSpeed's universal checkpoints (`ds_to_universal`): those do not cover
ZeRO-0 (no optimizer files to convert, and a ZeRO-0 engine cannot load one), and in DeepSpeed 0.19.8 loading
one under another ZeRO stage or pipeline depth fails or goes subtly wrong without patches (measured; README
"Resuming on another layout"). Reading DeepSpeed's files directly is one mechanism for every layout:

  ZeRO-1/2, and bf16-weights pipelines at ZeRO-0 (BF16_Optimizer): each data-parallel rank's optimizer file holds a
      slice of one flat fp32 buffer per parameter group (and AdamW's moments over the same buffer);
      `param_slice_mappings` names the parameter of each fragment. A parameter is its fragments in rank order.
  ZeRO-3: each rank holds ceil(numel / ranks) elements of every parameter (the last one padded), in the order
      of `param_shapes` (DeepSpeed's own zero_to_fp32 reads it the same way).
  ZeRO-0: the optimizer is torch's AdamW (fp32: the module's weights are the masters) or DeepSpeed's
      FP16_UnfusedOptimizer (bf16-weights/fp16: one fp32 copy per parameter); its state is indexed by position, in the
      order `engine.parameter_groups` gave the parameters. Pipelines have one such optimizer per stage; which
      layers a stage held follows from how many parameters its optimizer has.

Pipeline checkpoints hold the tied embedding on the first and the last stage: the first stage's is taken (the
last stage's position embedding is an unused copy). Every tensor is read through a memory map and written at
once, so memory stays near one parameter's size whatever the model's.
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from common.files import stale_temporaries
from pretrain.core.engine import parameter_groups
from pretrain.core.layout import Layout, saved_model
from pretrain.core.library_internals import weights_only_loads
from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from pretrain.core.pipeline_model import layer_file, plain_layer_names, plain_parameter_name
from pretrain.core.portable import KINDS, PortableState, write_portable
from pretrain.core.run_dir import CheckpointDir

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_STAGE_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


@dataclass(frozen=True)
class Piece:
    """`numel` elements at `start` of the flat tensor `flat(kind)` of one source file."""

    flat: Callable[[str], torch.Tensor]
    start: int
    numel: int


def _load(path: Path) -> Any:
    # mmap: tensors stay on disk until read, so holding every rank's file open costs no memory. weights_only,
    # DeepSpeed's checkpoint classes allowlisted: converting a checkpoint runs none of its pickled code.
    with weights_only_loads():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _step(states: list[dict[str, Any]]) -> int | None:
    steps = {int(float(s["step"])) for s in states if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer states disagree on AdamW's step count: {sorted(steps)}")
    return steps.pop() if steps else None


class Source:
    """A checkpoint's tensors by plain parameter name: `pieces[name]` assembles each kind in order."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.pieces: dict[str, list[Piece]] = defaultdict(list)
        self.owners: dict[str, int] = {}
        self.adam_step: int | None = None

    def claim(self, name: str, piece: Piece, stage: int) -> None:
        """Record a piece of `name` held by pipeline `stage`; another stage's copy (the tied embedding on the last
        stage) is skipped: the first stage's is the one trained."""
        if self.owners.setdefault(name, stage) == stage:
            self.pieces[name].append(piece)

    def get(self, kind: str, name: str) -> torch.Tensor:
        numel = math.prod(self.shapes[name])
        parts = [piece.flat(kind).detach().narrow(0, piece.start, piece.numel) for piece in self.pieces[name]]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return flat[:numel].float().view(self.shapes[name])

    def check_complete(self, checkpoint: CheckpointDir) -> None:
        missing = [name for name in self.shapes if not self.pieces.get(name)]
        if missing:
            raise UserError(f"{checkpoint.path} lacks parameters {missing[:3]}: the checkpoint is incomplete")


def _sliced(checkpoint: CheckpointDir, shapes: dict[str, tuple[int, ...]], n_layer: int) -> Source:
    """ZeRO-1/2 and BF16_Optimizer: fragments of flat per-group buffers, named by param_slice_mappings."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    files = sorted(
        (int(m.group(2)), int(m.group(1)), p) for p in checkpoint.path.iterdir() if (m := _OPTIM_FILE.match(p.name))
    )
    source, states = Source(shapes), []
    for stage, _rank, path in files:  # stages, then data-parallel ranks, in order
        saved = _load(path)[OPTIMIZER_STATE_DICT]
        base, masters = saved[BASE_OPTIMIZER_STATE], saved[SINGLE_PARTITION_OF_FP32_GROUPS]
        # elastic_checkpoint=true saves a list of per-group states; otherwise torch's state_dict format.
        group_states = base if isinstance(base, list) else [base["state"].get(g, {}) for g in range(len(masters))]
        states += group_states
        for group, mapping in enumerate(saved[PARAM_SLICE_MAPPINGS]):
            flats = {"master": masters[group], **group_states[group]}
            for wrapped, fragment in mapping.items():
                piece = Piece(flats.__getitem__, fragment.start, fragment.numel)
                source.claim(plain_parameter_name(wrapped, n_layer), piece, stage)
    source.adam_step = _step(states)
    return source


def _zero3(checkpoint: CheckpointDir, shapes: dict[str, tuple[int, ...]], n_layer: int) -> Source:
    """ZeRO-3: every parameter cut into equal, padded partitions, one per rank, in param_shapes order."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM_SHAPES

    files = sorted((int(m.group(1)), p) for p in checkpoint.path.iterdir() if (m := _OPTIM_FILE.match(p.name)))
    ranks = len(files)
    order = _load(checkpoint.path / "zero_pp_rank_0_mp_rank_00_model_states.pt")[PARAM_SHAPES]
    source, states = Source(shapes), []
    for _rank, path in files:  # in rank order
        saved = _load(path)[OPTIMIZER_STATE_DICT]
        for group, sub_group in enumerate(order):
            state = saved[OPTIMIZER_STATE_DICT]["state"].get(group, {})
            states.append(state)
            flats = {"master": saved[FP32_FLAT_GROUPS][group], **state}
            offset = 0
            for wrapped, shape in sub_group.items():
                part = math.ceil(math.prod(shape) / ranks)
                source.claim(plain_parameter_name(wrapped, n_layer), Piece(flats.__getitem__, offset, part), 0)
                offset += part
    source.adam_step = _step(states)
    return source


def _ordered_names(module: nn.Module) -> list[str]:
    """The module's parameter names in the order its optimizer was given them (engine.parameter_groups)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in parameter_groups(module, 0.0) for p in group["params"]]


def _stage_module(plain: GPT, layers: range) -> nn.Module:
    """A stand-in for a PipelineModule stage over `layers` of the plain model: the tied embedding first (in
    `tied_modules`), then each layer under its index, as PipelineModule registers them."""
    from pretrain.core.pipeline_model import plain_layer_sources

    sources, last = plain_layer_sources(plain), len(plain_layer_sources(plain)) - 1
    stage = nn.Module()
    if 0 in layers or last in layers:
        stage.tied_modules = nn.ModuleDict({"embedding": sources[0]})
    for index in layers:
        if index not in (0, last):
            stage.add_module(str(index), sources[index])
    return stage


def _zero0(checkpoint: CheckpointDir, plain: GPT, layout: Layout) -> Source:
    """ZeRO-0: torch's AdamW (masters: the module's weights) or FP16_UnfusedOptimizer (masters: fp32_groups),
    state indexed by position; one optimizer per pipeline stage."""
    from deepspeed.checkpoint.constants import FP32_GROUPS, OPTIMIZER_STATE_DICT

    shapes = {name: tuple(p.shape) for name, p in plain.named_parameters()}
    n_layer = plain.config.n_layer
    files = sorted((int(m.group(1)), p) for p in checkpoint.path.iterdir() if (m := _STAGE_FILE.match(p.name)))
    source, states = Source(shapes), []
    layers = len(plain_layer_names(plain))
    start = 0
    for stage, path in files:
        saved = _load(path)
        optimizer = saved["optimizer"]
        unfused = FP32_GROUPS in optimizer  # bf16-weights/fp16: per-parameter fp32 copies
        base = optimizer[OPTIMIZER_STATE_DICT] if unfused else optimizer
        index = [i for group in base["param_groups"] for i in group["params"]]
        masters = [t for group in optimizer[FP32_GROUPS] for t in group] if unfused else None
        if layout.pipeline_stages == 1:
            names = _ordered_names(plain)
        else:
            # The stage's layers: the one range from `start` whose parameter count is this optimizer's (every
            # block has parameters, so the count grows with each layer; the last stage ends at the head).
            fits = [
                stop
                for stop in range(start + 1, layers + 1)
                if (stage < len(files) - 1 or stop == layers)
                and len(_ordered_names(_stage_module(plain, range(start, stop)))) == len(index)
            ]
            if not fits:
                raise UserError(f"{path}: its optimizer matches no split of the model's layers; is it this model's?")
            names = [
                plain_parameter_name(n, n_layer) for n in _ordered_names(_stage_module(plain, range(start, fits[0])))
            ]
            start = fits[0]
        if len(names) != len(index):
            raise UserError(f"{path} holds {len(index)} optimizer parameters, the model {len(names)}: another model?")
        if masters is None and layout.pipeline_stages == 1:  # fp32: the module's weights are the masters
            module = {plain_parameter_name(key, n_layer): value for key, value in saved["module"].items()}
            masters = [module[name] for name in names]
        for position, (i, name) in enumerate(zip(index, names, strict=True)):
            state = base["state"].get(i, {})
            if state:
                states.append(state)
            master = masters[position] if masters is not None else _layer_weight(checkpoint, name, n_layer)
            flats = {"master": master.reshape(-1), **{k: v.reshape(-1) for k, v in state.items() if k in KINDS}}
            source.claim(name, Piece(flats.__getitem__, 0, master.numel()), stage)
    source.adam_step = _step(states)
    return source


def _layer_weight(checkpoint: CheckpointDir, name: str, n_layer: int) -> torch.Tensor:
    """A weight of a ZeRO-0 pipeline checkpoint, from its layer file (the first stage saves the embedding)."""
    if name.startswith("blocks."):
        block, attribute = name.removeprefix("blocks.").split(".", 1)
        index = int(block) + 1
    else:
        index, attribute = (0 if name.startswith(("wte.", "wpe.")) else n_layer + 1), name
    return _load_cached(layer_file(checkpoint.path, index))[attribute]


@functools.lru_cache(maxsize=8)
def _load_cached(path: Path) -> Any:
    return _load(path)


def _counters(checkpoint: CheckpointDir, layout: Layout) -> dict[str, Any]:
    """DeepSpeed's engine state in the first rank's model file: the schedule and the engine's counters."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if layout.zero_stage == 3 else "mp_rank_00_model_states.pt"
    return _load(checkpoint.path / name)


def open_source(checkpoint: CheckpointDir) -> tuple[Source, PortableState, GPT]:
    """The checkpoint's tensors by plain name, what the portable file records besides, and the model (on the
    meta device: its names and shapes, no memory)."""
    state = checkpoint.read_state()
    layout = Layout.of_checkpoint(state)
    model_fields = saved_model(state)
    if not model_fields:
        raise UserError(f"{checkpoint.state_file} does not record the model's shape; it cannot be converted")
    with torch.device("meta"):
        plain = GPT(ModelConfig(**model_fields))
    shapes = {name: tuple(p.shape) for name, p in plain.named_parameters()}
    n_layer = plain.config.n_layer
    if layout.zero_stage == 3:
        source = _zero3(checkpoint, shapes, n_layer)
    elif layout.partitions_optimizer:
        source = _sliced(checkpoint, shapes, n_layer)
    else:
        source = _zero0(checkpoint, plain, layout)
    source.check_complete(checkpoint)
    engine = _counters(checkpoint, layout)
    schedule = engine.get("lr_scheduler") or {}
    meta = PortableState(
        adam_step=source.adam_step,
        schedule_epoch=int(schedule.get("last_epoch", engine.get("global_steps", 0))),
        global_steps=int(engine.get("global_steps", 0)),
        global_samples=int(engine.get("global_samples", 0)),
        skipped_steps=int(engine.get("skipped_steps", 0)),
        source_tag=checkpoint.tag,
        source_layout=layout.describe(),
    )
    return source, meta, plain


def convert(checkpoint: CheckpointDir, *, progress: bool = False, kill_after_tensors: int | None = None) -> Path:
    """Write `checkpoint`'s portable form beside it (nothing in the checkpoint changes) unless it exists;
    returns its path. `kill_after_tensors`: fault injection (faults.py), SIGKILL after writing that many."""
    from tqdm import tqdm

    target = checkpoint.portable
    if target.is_file():
        return target
    _remove_stale_temporaries(target)
    source, meta, plain = open_source(checkpoint)
    shapes = [(name, tuple(p.shape)) for name, p in plain.named_parameters()]
    total = 4 * sum(math.prod(shape) for _, shape in shapes) * len(meta.kinds)
    count = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {checkpoint.tag}", disable=not progress) as bar:

        def written(size: int) -> None:
            nonlocal count
            bar.update(size)
            count += 1
            if kill_after_tensors is not None and count >= kill_after_tensors:
                os.kill(os.getpid(), signal.SIGKILL)

        write_portable(target, shapes, meta, source.get, written)
    return target


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of conversions that were killed (their process is gone): a rerun starts afresh."""
    for stale in stale_temporaries(target):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
