"""A disk cache of frozen-tower features, so a frozen encoder never encodes the same input twice.

Frozen-feature methods (projector-only alignment, linear probes, Tip-Adapter) spend nearly all of
their first epoch in the frozen towers. The cache stores each item's features once and every
later epoch, run or hyper-parameter sweep reads them back.

Keys. Features live in one folder per *feature space*: a hash of the backbone's
``config_dict()``, the SHA-256 of the weights that produce the features (parameters and buffers
of the tower, see :func:`tower_weight_names`), the image transform (always the deterministic
evaluation transform of ``model.preprocess``: cached features never carry random augmentation),
the tower and the output point (``embedding``: the tower's output embedding before L2
normalisation; ``trunk``: the input of a dual encoder's projection head), the parameter dtype, the
**precision the features were computed in** (the resolved ``fp32`` / ``bf16`` / ``fp16`` of the
kit's one encode path, ``core/encode.py``: features of different precisions never mix) and the
cache format. Inside a space every item has its own key: an image is identified by its
absolute path, modification time (ns) and size, a text by its content. Changing a weight, the
preprocessing or touching a file therefore gives a new key and recomputes only what changed.

Storage. Shards are safetensors files (never pickle) holding a ``features`` tensor (n, D) in
float32 and, in their metadata, the item keys of its rows. A shard is written under a temporary
name and moved into place with ``os.replace``, so a crash leaves either no shard or a whole one,
and concurrent writers (several training processes) cannot corrupt each other.

Bad images are never cached (no rows of zeros): they are counted and listed in the result and
retried on the next call.

Location: the ``root`` argument, else ``$DOMAINCLIP_CACHE``, else ``~/.cache/domainclip/features``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from ..backbones.base import Backbone
from ..checkpoint import atomic_write_bytes
from ..encode import FrozenEncoder, check_precision, model_device, resolve_precision
from ..data.dataset import Collator, ImageTextDataset
from ..data.records import ImageTextRecord, RecordSet
from ..data.transforms import build_image_transform
from ..token_merging.patch import token_merging_key

log = logging.getLogger("domainclip.features")

CACHE_ENV = "DOMAINCLIP_CACHE"
FORMAT_VERSION = 1
TOWERS = ("image", "text")
OUTPUTS = ("embedding", "trunk")
# The module whose *input* is the "trunk" output of each tower (dual encoder heads).
TRUNK_MODULES = {"image": "image_projection", "text": "text_projection"}
SHARD_PREFIX = "shard-"

ImageSource = RecordSet | ImageTextDataset | Sequence[ImageTextRecord] | Sequence[str | os.PathLike[str]]


def default_cache_root() -> Path:
    """``$DOMAINCLIP_CACHE`` when set, else ``~/.cache/domainclip/features``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "domainclip" / "features"


@dataclass
class CacheStats:
    """What one cache call did: items encoded by the tower, items read back, bad items."""

    computed: int = 0
    reused: int = 0
    bad: int = 0


@dataclass
class ImageFeatures:
    """Cached image features of a list of records.

    Attributes:
        features: (K, D) float32 on the CPU, one row per readable item, in input order.
        indices: (K,) position in the input of each row (bad items have no row).
        bad: (path, reason) of every item that could not be read; not cached.
        computed: items the tower encoded in this call.
        reused: items read from the cache.
        key: the feature space's key (a folder under the cache root).
    """

    features: torch.Tensor
    indices: torch.Tensor
    bad: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    key: str = ""

    def dense(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (size, D) table indexed by input position plus a bool mask of the rows present."""
        table = torch.zeros(size, self.features.shape[1], dtype=self.features.dtype)
        present = torch.zeros(size, dtype=torch.bool)
        table[self.indices] = self.features
        present[self.indices] = True
        return table, present


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------
def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def tower_weight_names(model: nn.Module, tower: str, output: str = "embedding") -> list[str]:
    """Names of the parameters and buffers that can change ``tower``'s ``output``, sorted.

    Conservative: everything except the *other* tower (by ``tower_prefixes``), the logit
    scale/bias and, for ``trunk``, the projection head after the capture point. A parameter the
    backbone does not attribute to a tower (an injected prompt, say) is therefore included.
    """
    _check_point(tower, output)
    prefixes = getattr(model, "tower_prefixes", {}) or {}
    other = tuple(prefixes.get("text" if tower == "image" else "image", ()))
    excluded = other + ((TRUNK_MODULES[tower] + ".",) if output == "trunk" else ())
    names = [name for name, _ in _named_tensors(model)
             if not (excluded and name.startswith(excluded)) and "logit_scale" not in name and "logit_bias" not in name]
    return sorted(names)


def weights_fingerprint(model: nn.Module, tower: str, output: str = "embedding") -> str:
    """SHA-256 over name, dtype, shape and bytes of every tensor in ``tower_weight_names``.

    Computed from the weights' content on every call (not memoised: an in-place change through
    ``.data`` would not bump a version counter); ~0.4 s for a ViT-B/32 image tower on a CPU.
    """
    tensors = dict(_named_tensors(model))
    return tensors_sha256((name, tensors[name]) for name in tower_weight_names(model, tower, output))


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over ``name|dtype|shape|`` and the raw bytes of each tensor, in the order given."""
    digest = hashlib.sha256()
    for name, tensor in named:
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _check_point(tower: str, output: str) -> None:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def feature_space(model: Backbone, tower: str, output: str = "embedding", precision: str = "auto") -> dict[str, Any]:
    """Everything the features of ``tower``/``output`` depend on, as a JSON-able dict.

    ``precision`` is resolved on the model's device first (``auto`` -> ``fp32`` or ``bf16``), so
    the key names the precision the features are actually computed in.
    """
    _check_point(tower, output)
    precision = resolve_precision(check_precision(precision, "feature cache precision"), model_device(model))
    if output == "trunk" and not isinstance(getattr(model, TRUNK_MODULES[tower], None), nn.Module):
        raise ValueError(f"output='trunk' reads the input of the model's {TRUNK_MODULES[tower]} (a dual encoder's "
                         f"head); {type(model).__name__} has no such module")
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point()})
    space = {"format": FORMAT_VERSION, "backbone": f"{type(model).__module__}.{type(model).__qualname__}",
             "config": model.config_dict(), "weights": weights_fingerprint(model, tower, output), "tower": tower,
             "output": output, "dtypes": dtypes, "precision": precision}
    if tower == "image":
        space["transform"] = {"kind": "evaluation (deterministic, no augmentation)",
                              "preprocess": model.preprocess.to_dict()}
        merging = token_merging_key(model)
        if merging is not None:  # only when set, so unmerged features keep their earlier keys
            space["token_merging"] = merging
    return space


def image_item_key(path: str | os.PathLike[str]) -> str:
    """Key of one image file: absolute path, modification time (ns) and size.

    Raises ``FileNotFoundError``/``OSError`` when the file cannot be inspected.
    """
    absolute = os.path.abspath(os.fspath(path))
    stat = os.stat(absolute)
    return _digest(["image", absolute, stat.st_mtime_ns, stat.st_size])[:40]


def text_item_key(text: str) -> str:
    return _digest(["text", text])[:40]


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
class FeatureCache:
    """Per-item features of frozen towers in safetensors shards under ``root``.

    Args:
        root: cache folder (default: ``$DOMAINCLIP_CACHE`` or ``~/.cache/domainclip/features``).
        shard_size: items per shard written (progress of a long first pass survives a crash).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, shard_size: int = 4096) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root).expanduser() if root else default_cache_root()
        self.shard_size = shard_size
        self.last_stats = CacheStats()
        self._indexes: dict[Path, dict[str, tuple[Path, int]]] = {}
        self._indexed_shards: dict[Path, set[str]] = {}

    # --- public API ------------------------------------------------------------------------
    def space_key(self, model: Backbone, tower: str, output: str = "embedding", precision: str = "auto") -> str:
        """The key (folder name) of ``model``'s ``tower``/``output`` feature space in ``precision``."""
        return _digest(feature_space(model, tower, output, precision))[:32]

    @torch.no_grad()
    def image_features(self, model: Backbone, source: ImageSource, batch_size: int = 64, num_workers: int = 0,
                       normalize: bool = True, output: str = "embedding", precision: str = "auto") -> ImageFeatures:
        """Features of every image of ``source``, encoding only the ones not cached yet.

        ``source`` is a ``RecordSet``, an ``ImageTextDataset`` (its records only: its own
        transform is not used, cached features always come from the evaluation transform), a
        list of ``ImageTextRecord`` or a list of paths. Returned rows are L2-normalised when
        ``normalize`` (the cache stores them unnormalised). Missing items are encoded with the
        weights held in ``precision`` (``core/encode.py``), which is part of the cache key.
        """
        paths = _image_paths(source)
        space = feature_space(model, "image", output, precision)
        folder = self._space_folder(space)
        keys: list[str | None] = []
        bad: dict[int, tuple[str, str]] = {}
        for position, path in enumerate(paths):
            try:
                keys.append(image_item_key(path))
            except OSError as error:
                keys.append(None)
                reason = "file not found" if isinstance(error, FileNotFoundError) else f"cannot stat: {error}"
                bad[position] = (path, reason)
        found = self._lookup(folder, [key for key in keys if key is not None])
        reused = sum(1 for key in keys if key is not None and key in found)
        missing = _first_positions(keys, skip=found)
        computed, unreadable = self._encode_images(model, folder, [(paths[p], keys[p]) for p in missing], output,
                                                   batch_size, num_workers, found, space["precision"])
        for position, key in enumerate(keys):
            if key is not None and key not in found:
                bad[position] = (paths[position], unreadable.get(paths[position], "could not be encoded"))
        rows = [position for position, key in enumerate(keys) if key is not None and key in found]
        features = self._read(folder, [found[keys[p]] for p in rows])
        if normalize and len(rows):
            features = torch.nn.functional.normalize(features, dim=-1)
        ordered_bad = [bad[p] for p in sorted(bad)]
        self.last_stats = CacheStats(computed=computed, reused=reused, bad=len(ordered_bad))
        if ordered_bad:
            log.warning("feature cache: %d of %d images could not be read and were not cached, e.g. %s",
                        len(ordered_bad), len(paths), ordered_bad[:3])
        return ImageFeatures(features, torch.tensor(rows, dtype=torch.long), ordered_bad, computed, reused,
                             folder.name)

    @torch.no_grad()
    def text_features(self, model: Backbone, texts: Sequence[str], batch_size: int = 256, normalize: bool = True,
                      output: str = "embedding", precision: str = "auto") -> torch.Tensor:
        """Features (len(texts), D) float32 on the CPU, encoding only texts not cached yet (with the
        weights held in ``precision``, part of the cache key)."""
        texts = [str(text) for text in texts]
        space = feature_space(model, "text", output, precision)
        folder = self._space_folder(space)
        keys = [text_item_key(text) for text in texts]
        found = self._lookup(folder, keys)
        todo = _first_positions(keys, skip=found)
        encoder = FrozenEncoder(model, space["precision"]) if todo else None
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            encoded = _encode(encoder, "text", output, model.tokenize([texts[i] for i in chunk]))
            found.update(self._write_shard(folder, [keys[i] for i in chunk], encoded))
        features = self._read(folder, [found[key] for key in keys])
        self.last_stats = CacheStats(computed=len(todo), reused=len(texts) - len(todo))
        return torch.nn.functional.normalize(features, dim=-1) if normalize and len(texts) else features

    # --- internals -------------------------------------------------------------------------
    def _space_folder(self, space: dict[str, Any]) -> Path:
        folder = self.root / _digest(space)[:32]
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "space.json"
        if not meta.is_file():
            atomic_write_bytes(meta, json.dumps(space, indent=2, sort_keys=True, default=str).encode())
        return folder

    def _lookup(self, folder: Path, keys: Sequence[str]) -> dict[str, tuple[Path, int]]:
        """``key -> (shard, row)`` for the keys already cached (reads only new shards' headers)."""
        index = self._indexes.setdefault(folder, {})
        seen = self._indexed_shards.setdefault(folder, set())
        for shard in sorted(folder.glob(f"{SHARD_PREFIX}*.safetensors")):
            if shard.name in seen:
                continue
            seen.add(shard.name)
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    items = json.loads((handle.metadata() or {})["items"])
            except Exception as error:  # a foreign or damaged file: ignore it, its items are recomputed
                log.warning("feature cache: ignoring unreadable shard %s (%s)", shard, error)
                continue
            for row, key in enumerate(items):
                index.setdefault(key, (shard, row))
        return {key: index[key] for key in keys if key in index}

    def _write_shard(self, folder: Path, keys: list[str], features: torch.Tensor) -> dict[str, tuple[Path, int]]:
        name = f"{SHARD_PREFIX}{_digest(keys)[:32]}.safetensors"
        target = folder / name
        temporary = folder / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            save_file({"features": features.detach().float().cpu().contiguous()}, str(temporary),
                      metadata={"items": json.dumps(keys), "format": str(FORMAT_VERSION)})
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        located = {key: (target, row) for row, key in enumerate(keys)}
        index = self._indexes.setdefault(folder, {})
        for key, place in located.items():
            index.setdefault(key, place)
        self._indexed_shards.setdefault(folder, set()).add(name)
        return located

    def _read(self, folder: Path, places: Sequence[tuple[Path, int]]) -> torch.Tensor:
        """Rows at ``places`` (shard, row), in order; one read per shard."""
        if not places:
            return torch.zeros(0, 0)
        by_shard: dict[Path, list[int]] = {}
        for position, (shard, _) in enumerate(places):
            by_shard.setdefault(shard, []).append(position)
        out: torch.Tensor | None = None
        for shard, positions in by_shard.items():
            with safe_open(str(shard), framework="pt") as handle:
                table = handle.get_tensor("features")
            if out is None:
                out = torch.empty(len(places), table.shape[1], dtype=torch.float32)
            out[positions] = table[[places[p][1] for p in positions]]
        return out

    def _encode_images(self, model: Backbone, folder: Path, todo: list[tuple[str, str]], output: str,
                       batch_size: int, num_workers: int, found: dict[str, tuple[Path, int]], precision: str
                       ) -> tuple[int, dict[str, str]]:
        """Encode ``todo`` (path, key) with the evaluation transform, writing shards as they fill.

        Returns the number encoded and ``path -> reason`` of the unreadable images (not written).
        """
        unreadable: dict[str, str] = {}
        if not todo:
            return 0, unreadable
        transform = build_image_transform(model.preprocess, train=False)
        records = [ImageTextRecord(image=path, captions=[]) for path, _ in todo]
        loader = DataLoader(ImageTextDataset(records, transform, train=False), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=Collator(None))
        encoder = FrozenEncoder(model, precision)
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []
        computed = 0
        for batch in loader:
            unreadable.update((str(path), str(reason)) for path, reason in batch["bad"])
            if not len(batch["indices"]):
                continue
            pending.append(_encode(encoder, "image", output, batch["images"]).cpu())
            pending_keys.extend(todo[i][1] for i in batch["indices"].tolist())
            if len(pending_keys) >= self.shard_size:
                found.update(self._write_shard(folder, pending_keys, torch.cat(pending)))
                computed += len(pending_keys)
                pending_keys, pending = [], []
        if pending_keys:
            found.update(self._write_shard(folder, pending_keys, torch.cat(pending)))
            computed += len(pending_keys)
        return computed, unreadable


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _first_positions(keys: Sequence[str | None], skip: dict[str, Any]) -> list[int]:
    """Position of the first occurrence of every key that is not None and not in ``skip``."""
    positions, queued = [], set()
    for position, key in enumerate(keys):
        if key is not None and key not in skip and key not in queued:
            queued.add(key)
            positions.append(position)
    return positions


def _image_paths(source: ImageSource) -> list[str]:
    if isinstance(source, ImageTextDataset):
        return [record.image for record in source.records]
    if isinstance(source, RecordSet):
        return [record.image for record in source.records]
    paths = []
    for position, item in enumerate(source):
        if isinstance(item, ImageTextRecord):
            paths.append(item.image)
        elif isinstance(item, (str, os.PathLike)):
            paths.append(os.fspath(item))
        else:
            raise TypeError(f"image source item {position} is a {type(item).__name__}; expected an ImageTextRecord "
                            f"or a path (or pass a RecordSet / ImageTextDataset)")
    return paths


def _encode(encoder: FrozenEncoder, tower: str, output: str, inputs: Any) -> torch.Tensor:
    """The unnormalised float32 ``output`` of ``tower`` for a batch (``trunk``: captured head input)."""
    encode = encoder.encode_image if tower == "image" else encoder.encode_tokens
    if output == "embedding":
        return encode(inputs, normalize=False)
    captured: list[torch.Tensor] = []
    head: nn.Module = getattr(encoder.model, TRUNK_MODULES[tower])
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        encode(inputs, normalize=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{TRUNK_MODULES[tower]} ran {len(captured)} times for one batch; expected once")
    return captured[0].float()
