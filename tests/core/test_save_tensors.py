"""The streamed safetensors writer (core/checkpoint.save_tensors): files the safetensors package
reads back exactly, without a second in-memory copy of the state."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from domainclip.core.checkpoint import save_tensors


def test_every_dtype_and_shape_reads_back_exactly(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "f32": base, "bf16": base.bfloat16() / 3, "f16": base.half(), "f64": base.double() / 7,
        "i64": torch.arange(5), "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "view_of_f32": base[1:3], "transposed": base.t(), "shares_storage": base.view(-1),
        "grad_tensor": torch.ones(3, requires_grad=True) * 2,
    }
    path = tmp_path / "all.safetensors"
    save_tensors(tensors, path, metadata={"format": "pt", "step": "7"})
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor.detach()), name
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "step": "7"}
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0  # the data starts 8-byte aligned


def test_the_file_is_as_large_as_the_safetensors_packages_own(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16()}
    save_tensors(tensors, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").stat().st_size == len(save(tensors))  # same header size, same data
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_a_dtype_safetensors_cannot_store_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tensor 'z' has dtype torch.complex64"):
        save_tensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")


SAVE_AND_REPORT = """
import resource, sys, torch
from domainclip.core.checkpoint import save_tensors
state = {f"t{i}": torch.ones(16 * 2**20 // 4) for i in range(16)}  # 256 MiB, resident
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
save_tensors(state, sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_saving_needs_no_second_copy_of_the_state(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SAVE_AND_REPORT, str(tmp_path / "big.safetensors")],
                          capture_output=True, text=True, check=True, timeout=120)
    grown_kib = int(done.stdout.split()[-1])
    assert grown_kib < 32 * 1024, f"peak memory grew by {grown_kib / 1024:.0f} MiB while saving 256 MiB"
    assert (tmp_path / "big.safetensors").stat().st_size > 256 * 2**20
