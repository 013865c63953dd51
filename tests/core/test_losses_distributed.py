"""Two CPU processes (DDP over gloo) must reproduce the single-process loss and gradients exactly.

One ``accelerate launch`` runs tests/core/_dist_loss_worker.py for every loss configuration; the
ranks hold UNEQUAL halves (5 and 3 rows) of a fixed global batch. The reference is computed here
in one process on the whole batch: open_clip's losses for the plain objectives, and our
single-process label-aware ClipLoss (checked against an explicit formula in test_losses.py).

Why not ``accelerate launch --cpu``: with ``--cpu`` accelerate always uses its "simple" launcher,
which starts ONE process unless ``mpirun`` and a hostfile are given (no MPI here). ``--multi_gpu``
only selects the torchrun launcher; with ``ACCELERATE_USE_CPU=1``, no visible CUDA device and
``Accelerator(cpu=True)`` in the worker, accelerate sets up MULTI_CPU with the gloo backend.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss
from safetensors.torch import load_file

from domainclip.core.losses import ClipLoss

pytestmark = pytest.mark.slow

WORKER_PATH = Path(__file__).resolve().parent / "_dist_loss_worker.py"
ACCELERATE_SCRIPT = Path(sys.executable).parent / "accelerate"
LAUNCH_TIMEOUT_S = 240


def _load_worker_module():
    spec = importlib.util.spec_from_file_location("_dist_loss_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker_module()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the worker once on 2 CPU processes for all configurations; return its output folder."""
    if not ACCELERATE_SCRIPT.exists():
        pytest.skip(f"no accelerate launcher next to the interpreter at {ACCELERATE_SCRIPT}")
    out_dir = tmp_path_factory.mktemp("dist_loss")
    command = [
        str(ACCELERATE_SCRIPT), "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(WORKER_PATH), "--out", str(out_dir),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    assert completed.returncode == 0, (
        f"accelerate launch failed with exit code {completed.returncode}\n"
        f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}"
    )
    return out_dir


def _single_process_reference(config: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss_name, _, label_aware = worker.CONFIGS[config]
    model = worker.build_model(config)
    image_inputs, text_inputs, labels = worker.global_batch()
    image_features, text_features, logit_scale, logit_bias = model(image_inputs, text_inputs)
    if label_aware:
        loss = ClipLoss(label_aware=True)(image_features, text_features, logit_scale, labels=labels)
    elif loss_name == "clip":
        loss = OpenClipLoss()(image_features, text_features, logit_scale)
    else:
        loss = OpenSigLipLoss()(image_features, text_features, logit_scale, logit_bias)
    loss.backward()
    return loss.detach(), {f"grad.{name}": param.grad for name, param in model.named_parameters()}


def test_gather_helpers_handle_uneven_batches(distributed_results: Path) -> None:
    checks = json.loads((distributed_results / "gather_checks.json").read_text())
    assert checks["world_size"] == 2
    assert checks["gathered_labels"] == list(worker.GLOBAL_LABELS)
    assert checks["offsets"] == [0, 5]
    assert checks["label_offset_rank0"] == 0
    assert checks["gathered_rows_first_column"] == [float(row) for row in range(worker.GLOBAL_BATCH)]
    # Each rank weighted the gathered tensor by rank + 1: the gather's backward must sum 1 + 2.
    assert checks["local_row_grad_rank0"] == [[3.0] * 3] * 5


@pytest.mark.parametrize("config", list(worker.CONFIGS))
def test_two_processes_match_single_process(distributed_results: Path, config: str) -> None:
    result_file = distributed_results / f"{config}.safetensors"
    assert result_file.exists(), f"worker wrote no result for {config} in {distributed_results}"
    results = load_file(str(result_file))
    expected_loss, expected_grads = _single_process_reference(config)

    torch.testing.assert_close(results.pop("loss")[0], expected_loss, atol=1e-6, rtol=0)
    assert sorted(results) == sorted(expected_grads)
    for name, expected_grad in expected_grads.items():
        assert expected_grad.abs().max() > 1e-4, f"{name}: reference gradient is ~0, the test is too weak"
        torch.testing.assert_close(
            results[name], expected_grad, atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_a_launch_that_starts_fewer_processes_than_asked_is_named() -> None:
    from domainclip.core.distributed import launch_mismatch

    # `accelerate launch --cpu --num_processes 2`: MASTER_ADDR/PORT set, no WORLD_SIZE, one process
    reason = launch_mismatch(1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "world size 1" in reason and "--multi_gpu --num_processes N" in reason
    assert "WORLD_SIZE=4 processes but 2 joined" in launch_mismatch(2, {"WORLD_SIZE": "4", "MASTER_ADDR": "h"})
    assert launch_mismatch(2, {"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == ""
    assert launch_mismatch(1, {}) == ""  # a plain single-process run
