"""The portable checkpoint file: a safetensors file any reader opens, written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from pretrain.core.portable import PortableReader, PortableState, write_portable

SHAPES = [("wte.weight", (5, 3)), ("blocks.0.ln_1.bias", (3,)), ("odd", (7,))]


def _state(adam_step: int | None = 4) -> PortableState:
    return PortableState(
        adam_step=adam_step,
        schedule_epoch=4,
        global_steps=4,
        global_samples=32,
        skipped_steps=0,
        source_tag="step-00000004",
        source_layout="ZeRO-2, 2 data-parallel ranks, fp32",
    )


def _value(kind: str, name: str) -> torch.Tensor:
    shape = dict(SHAPES)[name]
    seed = sum(map(ord, kind + name))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_written_tensors_and_state_read_back_exactly_and_by_any_safetensors_reader(tmp_path: Path) -> None:
    path = tmp_path / "step-00000004.portable.safetensors"
    sizes: list[int] = []
    write_portable(path, SHAPES, _state(), _value, sizes.append)
    assert sum(sizes) == path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")
    reader = PortableReader(path)
    assert reader.state == _state()
    assert reader.names() == sorted(name for name, _ in SHAPES)
    for name, _ in SHAPES:
        for kind, tensor in reader.tensors(name).items():
            assert torch.equal(tensor, _value(kind, name)), (kind, name)
    plain = load_file(str(path))  # safetensors' own reader
    assert set(plain) == {f"{kind}/{name}" for kind in ("master", "exp_avg", "exp_avg_sq") for name, _ in SHAPES}
    assert not list(tmp_path.glob(".*tmp*"))


def test_without_optimizer_moments_only_master_weights_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    write_portable(path, SHAPES, _state(adam_step=None), _value)
    reader = PortableReader(path)
    assert set(reader.tensors("odd")) == {"master"}


def test_a_conversion_that_fails_half_way_leaves_nothing_at_the_path(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"

    def failing(kind: str, name: str) -> torch.Tensor:
        if name == "odd":
            raise OSError("No space left on device")
        return _value(kind, name)

    with pytest.raises(OSError, match="No space left"):
        write_portable(path, SHAPES, _state(), failing)
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="expected"):  # a tensor of the wrong shape is a bug, not written
        write_portable(path, SHAPES, _state(), lambda kind, name: torch.zeros(2))
    assert not path.exists()


def test_an_unreadable_or_foreign_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(UserError, match="delete it"):
        PortableReader(path)
    write_portable(path, SHAPES, _state(), _value)
    with pytest.raises(UserError, match=r"has no master/blocks\.9\.attn\.weight: it was converted from another model"):
        PortableReader(path).get("master", "blocks.9.attn.weight")
