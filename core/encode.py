"""The one encode path: frozen weights at the best precision the device computes fast.

Every place that encodes images or texts without training them (the zero-shot API and
``domainclip classify``, evaluation, the feature cache, teachers) goes through
:class:`FrozenEncoder`. It holds the weights in one dtype, **cast once** when it is built (not
autocast at every call, which re-casts every weight at every forward pass and is slower than fp32
on a CPU), and always returns float32, L2-normalised features. The model it is built from is
never changed: for a precision other than the model's own dtype the encoder works on a copy.

Precision (``precision`` everywhere in the kit): ``fp32``, ``bf16``, ``fp16`` or ``auto``.
``auto`` (the default) is decided by :func:`resolve_precision`:

- CUDA device with compute capability >= 8.0 (Ampere and later: native bf16 tensor cores) -> bf16;
- CPU whose ``/proc/cpuinfo`` flags include ``avx512_bf16``, ``amx_bf16`` or ``amx_tile``
  (Cooper Lake, Sapphire Rapids and later, Zen 4 and later) -> bf16;
- anything else (older GPUs, CPUs without bf16 instructions, where bf16 is emulated and slower
  than fp32, Apple MPS) -> fp32.

``$DOMAINCLIP_CPU_BF16`` (``0`` or ``1``) overrides the CPU's flags: ``0`` keeps ``auto`` at fp32
on any CPU (numbers that match a machine without bf16 instructions; the test suite sets it), ``1``
treats the CPU as bf16-capable.

On a CPU, a bf16 copy also gets its plain ``nn.Linear`` layers replaced by :class:`PackedLinear`:
the same oneDNN product with the weight reordered into oneDNN's layout once, where eager
``F.linear`` reorders it at every call. The features are equal bit for bit; on an AMD Zen 4 one
image encoded 1.24x faster, batches of 4 to 64 images 1.07-1.13x (``bench/packed_linear.py``),
for a second copy of the linear weights in memory. ``$DOMAINCLIP_CPU_PACKED_LINEAR=0`` turns it off.

bf16 keeps fp32's range, so features of a CLIP tower agree with fp32 to a cosine of about 0.999;
the accuracy guard (``tests/core/test_encode.py``, ``bench/precision_guard.py``) checks top-1
agreement >= 99.5 % and metrics within 0.5 points. ``fp16`` is meant for GPUs.

This module also holds the kit's one definition of "the model's device" (:func:`model_device`)
and of "eval mode for a block" (:func:`eval_mode`).
"""
from __future__ import annotations

import copy
import functools
import itertools
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
"""``/proc/cpuinfo`` flags of CPUs with native bf16 arithmetic (any one is enough)."""
CPU_BF16_ENV = "DOMAINCLIP_CPU_BF16"
"""``0`` / ``1``: override what the host CPU's flags say about bf16 (see the module docstring)."""
PACKED_LINEAR_ENV = "DOMAINCLIP_CPU_PACKED_LINEAR"
"""``0``: keep a CPU bf16 encoder's ``nn.Linear`` layers as they are (no :class:`PackedLinear`)."""

__all__ = ["CPU_BF16_ENV", "CPU_BF16_FLAGS", "DTYPES", "PACKED_LINEAR_ENV", "PRECISIONS", "FrozenEncoder",
           "PackedLinear", "canonical_device", "check_precision", "cpu_has_fast_bf16", "env_switch", "eval_mode",
           "model_device", "model_float_dtype",
           "pack_cpu_linears", "packed_linear_available", "resolve_precision"]


def check_precision(precision: str, where: str = "precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming ``where``."""
    if precision not in PRECISIONS:
        import difflib

        close = difflib.get_close_matches(str(precision), PRECISIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where} must be one of {PRECISIONS}, got {precision!r}{hint}")
    return precision


def cpu_has_fast_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU has native bf16 instructions (AVX-512 BF16 or AMX), from its cpuinfo flags.

    ``cpuinfo`` is the file to read (tests pass a fake one); an unreadable file (not Linux) means no.
    For the host's own file, ``$DOMAINCLIP_CPU_BF16`` (``0`` / ``1``) overrides the flags.
    """
    path = Path(cpuinfo)
    if path == Path("/proc/cpuinfo"):
        forced = env_switch(CPU_BF16_ENV)
        return _host_cpu_has_fast_bf16() if forced is None else forced
    return _flags_have_bf16(path)


def env_switch(name: str) -> bool | None:
    """An on/off environment variable: ``1`` -> True, ``0`` -> False, unset -> None; any other
    value is an error (a misspelt ``false`` must not leave the switch silently on)."""
    value = os.environ.get(name)
    if value is None:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"${name} must be 0 or 1, got {value!r}")
    return value == "1"


def canonical_device(device: str | torch.device) -> torch.device:
    """``device`` as its tensors report it: ``cuda`` -> ``cuda:0`` (the current GPU), ``cpu:0`` -> ``cpu``,
    so that two names of one device compare equal."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    return torch.empty(0, device=device).device if device.index is None else device


@functools.lru_cache(maxsize=1)
def _host_cpu_has_fast_bf16() -> bool:
    return _flags_have_bf16(Path("/proc/cpuinfo"))


def _flags_have_bf16(path: Path) -> bool:
    try:
        text = path.read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: str | torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for ``precision`` on ``device`` (``auto``: see the module docstring)."""
    check_precision(precision)
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16(cpuinfo) else "fp32"
    return "fp32"


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the model's first floating-point parameter (float32 for a model with none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextmanager
def eval_mode(model: nn.Module, no_grad: bool = True) -> Iterator[nn.Module]:
    """Eval mode (and no autograd unless ``no_grad=False``) for the block.

    The train/eval flag of every submodule is restored after, exactly as it was (a wrapper that
    keeps its frozen backbone in eval mode while training stays so).
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        if no_grad:
            with torch.no_grad():
                yield model
        else:
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``model`` whose floating-point parameters and buffers are ``dtype``.

    The cast tensors are placed in the copy's memo, so the fp32 weights are never duplicated
    (peak memory: source + one copy in ``dtype``).
    """
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        if id(parameter) not in memo:
            data = parameter.detach().to(dtype) if parameter.is_floating_point() else parameter.detach().clone()
            memo[id(parameter)] = nn.Parameter(data, requires_grad=False)
    for buffer in model.buffers():
        if id(buffer) not in memo:
            memo[id(buffer)] = buffer.detach().to(dtype) if buffer.is_floating_point() else buffer.detach().clone()
    return copy.deepcopy(model, memo)


def packed_linear_available(dtype: torch.dtype) -> bool:
    """Whether this torch build runs ``dtype`` linear layers on oneDNN with packed weights on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not all(hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")):
        return False
    return dtype != torch.bfloat16 or bool(ops._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """An ``nn.Linear`` for CPU inference whose weight is reordered into oneDNN's layout once.

    Eager ``F.linear`` in bf16 on a CPU runs oneDNN's product too, but reorders the weight at every
    call; this runs the same product on a weight reordered when the layer is built (what inductor's
    freezing pass does), so in bf16 the output equals ``nn.Linear``'s bit for bit. (In fp32 eager
    runs MKL's product instead, and the two agree only to rounding; the kit packs bf16 copies
    only.) ``weight`` and ``bias`` stay as they were (other code may read them), so the weight is
    held twice. A write to the weight (``load_state_dict``, an in-place update, ``.float()``) is
    seen at the next call, which packs it again. Inputs the packed product cannot take (another
    device or dtype, no rows, or a graph that needs gradients) go through ``F.linear``. The
    packed weight is never copied or pickled (oneDNN's opaque tensors cannot be): a copy packs its
    own weight again.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self._pack()

    def _weight_state(self) -> tuple[int, int, torch.dtype, torch.device]:
        weight = self.weight
        return weight.data_ptr(), weight._version, weight.dtype, weight.device

    def _pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self._packed_state = self._weight_state()

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key not in ("packed", "_packed_state")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type != "cpu" or self.weight.device.type != "cpu" or x.dtype != self.weight.dtype \
                or x.numel() == 0 or needs_grad:
            return F.linear(x, self.weight, self.bias)
        if self._weight_state() != self._packed_state:  # the weight was written or replaced
            self._pack()
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_cpu_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` (not a subclass, such as attention's ``out_proj``, whose
    weight its parent reads directly) on the CPU in ``model`` with a :class:`PackedLinear`, in
    place; a layer shared by several parents is packed once. Returns how many layers were packed."""
    packed: dict[int, PackedLinear] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                if id(child) not in packed:
                    packed[id(child)] = PackedLinear(child)
                setattr(parent, name, packed[id(child)])
    return len(packed)


class FrozenEncoder:
    """Float32 normalised features of a model's towers, computed with weights held in one dtype.

    Args:
        model: a backbone (or a method's wrapper of one) with ``encode_image``, ``encode_text``
            and ``tokenize``; never modified.
        precision: ``auto`` / ``fp32`` / ``bf16`` / ``fp16`` (see :func:`resolve_precision`).
        device: where to compute; default the model's device.
        pack_linears: pack the linear layers of a bf16 copy on a CPU (:class:`PackedLinear`, same
            features); default: yes, unless :data:`PACKED_LINEAR_ENV` is ``0`` (``0`` or ``1``; any
            other value is an error). The attribute can
            be changed; :meth:`refresh` applies it.

    When the resolved dtype is the model's own, the encoder runs the model itself (no copy);
    else it holds a frozen copy cast once (in bf16 on a CPU, with its linear layers packed:
    :class:`PackedLinear`; ``packed_linears`` counts them). Call :meth:`refresh` after the
    source's weights change.
    The encoder always runs in eval mode under ``torch.no_grad`` (its features may serve as
    training targets, which inference-mode tensors could not).
    """

    def __init__(self, model: nn.Module, precision: str = "auto", device: str | torch.device | None = None,
                 pack_linears: bool | None = None):
        self.source = model
        self.pack_linears = env_switch(PACKED_LINEAR_ENV) is not False if pack_linears is None else pack_linears
        self.device = canonical_device(device) if device is not None else model_device(model)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = DTYPES[self.precision]
        self.packed_linears = 0
        self.model = self._build()

    @classmethod
    def of(cls, model: "nn.Module | FrozenEncoder", precision: str = "auto") -> "FrozenEncoder":
        """``model`` itself when it is already an encoder, else a new encoder of it."""
        return model if isinstance(model, FrozenEncoder) else cls(model, precision)

    @property
    def copied(self) -> bool:
        """Whether the encoder holds its own cast copy (False: it runs the source model)."""
        return self.model is not self.source

    def _build(self) -> nn.Module:
        self.packed_linears = 0
        if model_device(self.source) == self.device and model_float_dtype(self.source) == self.dtype:
            return self.source
        if model_float_dtype(self.source) == self.dtype:  # only the device differs: move a copy
            frozen = copy.deepcopy(self.source).to(self.device).requires_grad_(False)
        else:
            frozen = _cast_copy(self.source, self.dtype).to(self.device).eval()
        if self.pack_linears and self.device.type == "cpu" and self.dtype == torch.bfloat16:
            if packed_linear_available(self.dtype):
                self.packed_linears = pack_cpu_linears(frozen)
            elif _host_cpu_has_fast_bf16():  # a CPU that should pack: say why it does not
                warnings.warn(f"this torch build ({torch.__version__}) cannot pack bf16 linear layers for oneDNN "
                              "(torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise or oneDNN bf16 "
                              "missing); they run eagerly: the same features, more slowly. Set "
                              f"{PACKED_LINEAR_ENV}=0 to silence this.", stacklevel=3)
        return frozen

    def refresh(self) -> None:
        """Cast the source's current weights again (after they changed)."""
        self.model = self._build()

    @property
    def preprocess(self) -> Any:
        return self.source.preprocess

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.source.tokenize(texts)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Features (B, D) float32 of a preprocessed image batch (moved and cast here)."""
        images = images.to(device=self.device, dtype=self.dtype)
        with eval_mode(self.model):
            features = self.model.encode_image(images, normalize=False).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_tokens(self, tokens: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Features (B, D) float32 of tokenized texts."""
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        with eval_mode(self.model):
            features = self.model.encode_text(tokens, normalize=False).float()
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised pooled features (B, D), per-token normalised final-layer tokens (B, I, D), both
        float32, and the token mask (B, I) bool, from one pass (``Backbone.encode_image_tokens``)."""
        images = images.to(device=self.device, dtype=self.dtype)
        with eval_mode(self.model):
            out = self.model.encode_image_tokens(images)
        return F.normalize(out.pooled.float(), dim=-1), F.normalize(out.tokens.float(), dim=-1), out.mask.bool()

    def encode_text_tokens(self, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`encode_image_tokens` for tokenized texts (``Backbone.encode_text_tokens``)."""
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        with eval_mode(self.model):
            out = self.model.encode_text_tokens(tokens)
        return F.normalize(out.pooled.float(), dim=-1), F.normalize(out.tokens.float(), dim=-1), out.mask.bool()

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Features (N, D) float32 on the encoder's device of ``texts``, ``batch_size`` at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(texts) == 0:
            raise ValueError("encode_texts got no texts")
        parts = [self.encode_tokens(self.tokenize(list(texts[start:start + batch_size])), normalize)
                 for start in range(0, len(texts), batch_size)]
        return torch.cat(parts)
