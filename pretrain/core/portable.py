"""The portable checkpoint: a training state that no layout shaped, which any layout loads.

DeepSpeed's files are cut to the layout that wrote them: ZeRO partitions flat buffers per data-parallel rank,
a pipeline keeps one optimizer per stage, torch.compile renames every parameter. The portable form holds, per
parameter of the plain GPT (the names of `GPT.named_parameters()`, the tied embedding once), in full shape
and fp32:

    master/<name>       the optimizer's master weight (the fp32 copy under bf16-weights/fp16)
    exp_avg/<name>      AdamW's first moment
    exp_avg_sq/<name>   AdamW's second moment

plus, as JSON in the file's metadata: AdamW's step count, the schedule's position, DeepSpeed's counters and the
layout it came from. That is the whole optimizer state of AdamW; the hyper-parameters (betas, weight decay,
clipping, peak learning rate) are the run config's.

The file is a safetensors file (one file; any safetensors reader opens it), written in one pass one tensor at
a time, so a conversion holds one parameter in memory, not the model; readers memory-map it, so each rank reads
only its own parameters and the ranks of a node share the page cache. It is written under a temporary name and
renamed when complete (common/files.py).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.files import open_atomic

FORMAT = "gpt-pretrain-portable/1"
KINDS = ("master", "exp_avg", "exp_avg_sq")
_METADATA_KEY = "pretrain"


def tensor_key(kind: str, name: str) -> str:
    return f"{kind}/{name}"


@dataclass(frozen=True)
class PortableState:
    """What the portable file holds besides the tensors."""

    # AdamW's step count (bias correction); None when no optimizer step was ever applied (no moments stored).
    adam_step: int | None
    # The LR schedule's position: LambdaLR.last_epoch, i.e. the optimizer steps applied.
    schedule_epoch: int
    # DeepSpeed's engine counters.
    global_steps: int
    global_samples: int
    skipped_steps: int
    # Where it came from: the checkpoint's tag and layout (for messages).
    source_tag: str
    source_layout: str

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS if self.adam_step is not None else KINDS[:1]


def write_portable(
    path: Path,
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    state: PortableState,
    produce: Callable[[str, str], torch.Tensor],
    written: Callable[[int], None] = lambda _: None,
) -> None:
    """Write every kind of every (name, shape) in `shapes`, asking `produce(kind, name)` for one tensor at a time
    (fp32, that shape); `written(bytes)` after each. The file appears at `path` only when complete."""
    entries = [(tensor_key(kind, name), shape) for name, shape in shapes for kind in state.kinds]
    header: dict[str, Any] = {"__metadata__": {_METADATA_KEY: json.dumps({"format": FORMAT, **asdict(state)})}}
    offset = 0
    for key, shape in entries:
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes (padding with spaces)
    with open_atomic(path) as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, shape in entries:
            kind, name = key.split("/", 1)
            tensor = produce(kind, name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != torch.float32:
                raise RuntimeError(f"{key}: got {tuple(tensor.shape)} {tensor.dtype}, expected {shape} float32")
            # Little-endian raw bytes, as safetensors stores them (every platform torch supports is little-endian).
            handle.write(tensor.detach().contiguous().numpy().data)
            written(4 * tensor.numel())


class PortableReader:
    """A portable checkpoint opened for reading (memory-mapped; tensors are read on demand)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            metadata = json.loads((self._file.metadata() or {})[_METADATA_KEY])
        except Exception as error:  # OSError, a missing key, or safetensors' own SafetensorError
            raise UserError(
                f"{path} is not a readable portable checkpoint ({error}); delete it and it is converted again"
            ) from error
        if metadata.pop("format", None) != FORMAT:
            raise UserError(f"{path} was written by another version (not {FORMAT}); delete it to convert again")
        self.state = PortableState(**metadata)
        self._keys = set(self._file.keys())

    def names(self) -> list[str]:
        return sorted(key.split("/", 1)[1] for key in self._keys if key.startswith("master/"))

    def get(self, kind: str, name: str) -> torch.Tensor:
        key = tensor_key(kind, name)
        if key not in self._keys:
            raise UserError(f"{self.path} has no {key}: it was converted from another model; delete it")
        return self._file.get_tensor(key)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Every kind stored for parameter `name`."""
        return {kind: self.get(kind, name) for kind in self.state.kinds}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
