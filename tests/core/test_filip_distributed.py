"""FILIP under two CPU processes (DDP over gloo) equals one process on the global batch, in fp32.

Ranks hold unequal numbers of pairs (5 and 3) AND text tokens of different lengths (7 and 4), so
the token gather's padding is exercised. Launch details: see test_losses_distributed.py.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

WORKER_PATH = Path(__file__).resolve().parent / "_dist_filip_worker.py"
ACCELERATE_SCRIPT = Path(sys.executable).parent / "accelerate"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load("_dist_filip_worker", WORKER_PATH)
_free_port = _load("_losses_dist", Path(__file__).resolve().parent / "test_losses_distributed.py")._free_port


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ACCELERATE_SCRIPT.exists():
        pytest.skip(f"no accelerate launcher next to the interpreter at {ACCELERATE_SCRIPT}")
    out_dir = tmp_path_factory.mktemp("dist_filip")
    command = [str(ACCELERATE_SCRIPT), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), str(WORKER_PATH), "--out", str(out_dir)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"accelerate launch failed\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    return out_dir


@pytest.mark.parametrize("config", list(worker.CONFIGS))
def test_two_processes_match_single_process(results: Path, config: str) -> None:
    model = worker.build_model()
    loss = worker.loss_of(model, worker.build_loss(config), worker.global_batch())
    loss.backward()
    got = load_file(str(results / f"{config}.safetensors"))
    torch.testing.assert_close(got.pop("loss")[0], loss.detach(), atol=1e-6, rtol=0)
    for name, param in model.named_parameters():
        assert param.grad.abs().max() > 1e-4, f"{name}: reference gradient is ~0, the test is too weak"
        torch.testing.assert_close(got[f"grad.{name}"], param.grad, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
