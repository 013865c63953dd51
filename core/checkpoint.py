"""Crash-safe checkpoints in safetensors (weights, optimizer state, RNG) plus JSON metadata.

A checkpoint is a folder ``checkpoints/step_NNNNNNN``. It is written under a temporary name, every
file is flushed to disk, and only then renamed into place; the ``latest`` pointer is replaced
atomically afterwards. A kill at any moment therefore leaves the previous checkpoint loadable.
Nothing here unpickles: tensors live in safetensors, everything else in JSON.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from .errors import UserError

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that readers see the old or the new file, never half of one.

    The temporary name is unique per process and call, so concurrent writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically, see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, streamed: each tensor's bytes go from its own
    memory to the file, so saving needs no second copy of the state (the safetensors package
    builds the whole file in memory first; for a 151 M-parameter model and its AdamW state that
    is 1.8 GB more at every checkpoint). Tensors sharing storage are written separately; CPU
    tensors that are already contiguous are not copied at all. The file is written under a temporary
    name, flushed to disk and then moved into place: a kill mid-write leaves the earlier file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write_tensors(tensors, path, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path, tmp: Path, metadata: dict[str, str] | None) -> None:
    prepared = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    if sys.byteorder != "little":  # the format is little-endian; memory here is not: the package converts
        save_file({name: tensor.clone() for name, tensor in prepared.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        return
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in prepared.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the format's own writer pads
    with open(tmp, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in prepared.values():
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        handle.flush()
        os.fsync(handle.fileno())


# --- the kit never unpickles: every weights path is checked here first -------------------------------

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar", ".pt.tar", ".pth.tar")


class UnsafeWeightsError(UserError, ValueError):
    """A weights file (or a folder's weights) is not safetensors: loading it could unpickle."""


def weights_format(path: Path) -> str:
    """``safetensors``, ``pickle`` (a PyTorch zip archive or a raw pickle) or ``unknown``, by content.

    safetensors: an 8-byte little-endian header length that fits the file, then a JSON ``{``.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5):
        return "pickle"
    return "unknown"


def _refusal(path: Path, what: str, found: str, target: Path) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"{what}: {path} is {found}; the kit loads weights only from safetensors and never unpickles. "
        f"Convert it once: domainclip convert-weights {path} {target}")


def require_safetensors(path: str | Path, what: str = "weights") -> Path:
    """Refuse anything but safetensors before any loader sees ``path``; returns it.

    A file must be safetensors by content (a ``.PT``, ``.pt.tar`` or suffix-less pickle is caught
    as well as a pickle renamed ``.safetensors``). A folder (Hugging Face, open_clip ``local-dir:``)
    must hold its weights as ``*.safetensors`` (each checked by content); a folder whose only
    weights are pickles (``pytorch_model.bin``) is refused. Loaders then read with
    ``use_safetensors=True``. A path that does not exist is refused when its name is a pickle's
    (``x.pt``), else left to the caller (a hub id, a pretrained tag, ``""``: nothing to check).
    """
    if not str(path):
        return Path(path)
    path = Path(path).expanduser()
    if not path.exists() and path.name.lower().endswith(PICKLE_SUFFIXES):
        raise _refusal(path, what, "named as a pickled PyTorch checkpoint", path.with_name(path.name.split(".")[0] + ".safetensors"))
    if path.is_file():
        kind = weights_format(path)
        if kind != "safetensors":
            found = "a pickled PyTorch checkpoint" if kind == "pickle" else "not a safetensors file"
            stem = path.name.split(".")[0] or path.name
            raise _refusal(path, what, found, path.with_name(stem + ".safetensors"))
        return path
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file())
        tensors = [f for f in files if f.name.endswith(".safetensors")]
        for file in tensors:
            require_safetensors(file, what)
        if not tensors:
            pickled = [f for f in files if f.name.lower().endswith(PICKLE_SUFFIXES) or weights_format(f) == "pickle"]
            if pickled:
                raise _refusal(pickled[0], what, f"the only weights in {path} and a pickled PyTorch checkpoint",
                               path / "model.safetensors")
    return path


def load_safetensors_into(model: nn.Module, path: str | Path, strict: bool = True, what: str = "weights") -> list[str]:
    """Load a safetensors file into ``model``; returns missing keys. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    state = load_file(str(require_safetensors(path, what)))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise KeyError(f"{what}: {path} has {len(unexpected)} keys this model does not have, e.g. {unexpected[:5]}")
    mismatched = [k for k, v in state.items() if own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"{what}: {path} key {k!r} has shape {tuple(state[k].shape)}, model expects {tuple(own[k].shape)}")
    result = model.load_state_dict(state, strict=False)
    if strict and result.missing_keys:
        raise KeyError(f"{what}: {path} lacks {len(result.missing_keys)} keys, e.g. {result.missing_keys[:5]}")
    return list(result.missing_keys)


NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict")


def _nested_state_dict(loaded: Any, key: str, source: Path) -> Any:
    """``loaded[key]`` (an error if absent), else the first of :data:`NESTED_STATE_KEYS` present,
    else ``loaded`` itself."""
    if key:
        if not (isinstance(loaded, dict) and isinstance(loaded.get(key), dict)):
            keys = sorted(map(str, loaded))[:10] if isinstance(loaded, dict) else type(loaded).__name__
            raise KeyError(f"convert-weights: {source} has no dict under key {key!r}; top-level keys: {keys}")
        return loaded[key]
    found = [name for name in NESTED_STATE_KEYS if isinstance(loaded, dict) and isinstance(loaded.get(name), dict)]
    return loaded[found[0]] if found else loaded


def convert_torch_checkpoint(source: str | Path, target: str | Path, key: str = "") -> dict[str, Any]:
    """Rewrite a PyTorch ``.pt``/``.bin`` state dict (e.g. a published CLIP checkpoint) as safetensors.

    The kit loads weights only from safetensors; this is the one deliberate exception, run by the
    user once per downloaded file. It uses ``torch.load(weights_only=True)``, PyTorch's restricted
    unpickler that rebuilds tensors and plain containers only and refuses any other object, so a
    malicious file fails instead of running code. ``key`` picks a nested state dict
    (``state_dict``, ``model``); by default the first of those present is used. A ``module.``
    prefix left by DistributedDataParallel is removed. Returns a summary (tensors, parameters).
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"convert-weights: {source} does not exist")
    if target.suffix != ".safetensors":
        raise ValueError(f"convert-weights: the target {target} must end in .safetensors")
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # the restricted unpickler names the refused global
        raise ValueError(f"convert-weights: {source} is not a plain tensor checkpoint "
                         f"(torch.load(weights_only=True) refused it: {error})") from error
    state = _nested_state_dict(loaded, key, source)
    if not isinstance(state, dict):
        raise ValueError(f"convert-weights: {source} holds a {type(state).__name__}, expected a state dict")
    others = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f"convert-weights: {source} mixes non-tensor entries into its state dict, e.g. {others[:5]}; "
                         f"pass key=... naming the nested state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, save({k: v.detach().contiguous().clone() for k, v in state.items()},  # tied: own copies
                                    metadata={"converted_from": source.name}))
    return {"target": str(target), "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))}


# --- optimizer and RNG state without pickle ------------------------------------------------------

def optimizer_to_safetensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    # by device number: sorted as text, torch_cuda_10 would come before torch_cuda_2
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k[len("torch_cuda_"):]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --- checkpoint folders ----------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """A fresh temporary folder to write checkpoint ``step`` into."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp: Path, step: int, keep: int = 2) -> Path:
    """Move a fully written temporary folder into place, point ``latest`` at it, prune old ones.

    A checkpoint of the same step already in place is renamed aside (``.old-step_N``) and deleted
    only once the new one is in place: a kill at any moment leaves one complete folder of that
    step, which :func:`latest_checkpoint` finds.
    """
    root = tmp.parent
    final = root / checkpoint_name(step)
    replace_folder(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep > 0:
        finished = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def replace_folder(new: Path, final: Path) -> None:
    """Put the fully written folder ``new`` in place of ``final``, so that a kill at any moment
    leaves one complete folder: the old one is renamed aside (``.old-NAME``) and deleted only once
    the new one is in place; :func:`restore_folder` puts it back after a kill in between."""
    aside = final.parent / f".old-{final.name}"
    _fsync_dir(new)
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(new, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def restore_folder(final: Path) -> bool:
    """After a kill inside :func:`replace_folder`: when ``final`` is missing and the folder moved
    aside is there, put it back. ``True`` when ``final`` was restored."""
    aside = final.parent / f".old-{final.name}"
    if final.exists() or not aside.is_dir():
        return False
    os.replace(aside, final)
    return True


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``latest`` points at, or ``None`` when there is no finished checkpoint.

    When a kill interrupted the re-commit of that step (its folder moved aside, the new one not yet
    in place), the folder moved aside is put back; when the folder is gone otherwise, the newest
    finished ``step_*`` folder is taken instead of starting from scratch.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if folder.is_dir() or restore_folder(folder):
        return folder
    finished = sorted(p for p in root.glob("step_*") if p.is_dir())
    return finished[-1] if finished else None


def write_json(path: str | Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)
