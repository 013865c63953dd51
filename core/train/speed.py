"""Training speed-ups that leave the mathematics unchanged.

Each function here makes training faster without changing the model, the batch, the precision
or the loss; results differ from the plain path at most by floating-point rounding (a different
summation order inside a kernel), never by what is computed.

* :func:`tune_cpu_allocator` -- on CPU, every step allocates and frees gigabytes of activations
  and gradients. glibc's malloc returns freed memory at the top of its heap to the kernel and
  the next step faults it back in page by page (hundreds of thousands of page faults per step
  for ViT-B-32, half a second of kernel time on two cores). Keeping freed memory in the
  process removes that; the peak footprint is unchanged (the same memory is reused).
* :func:`adamw_kwargs` -- torch's fused AdamW updates every parameter in one kernel instead of
  a dozen element-wise passes per tensor (about 8x faster on CPU for a 150M-parameter model).
* :func:`tune_cuda_kernels` -- on a GPU, cuDNN times its convolution algorithms once per input
  shape and keeps the fastest (``torch.backends.cudnn.benchmark``; open_clip_train does the
  same). A training step's shapes repeat, so the timing is paid once.
* the open_clip text tower runs on the batch's longest caption instead of the full 77-token
  context, rounded up to a multiple of 8 on a GPU (``encode_text_trimmed`` in
  ``core/backbones/families/open_clip/text_trim.py``, next to the backbone it speeds up).
* on CPU, short attention with gradients runs torch's math kernel and the patch embedding runs
  as one matrix product (``core/train/cpu_kernels.py``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger("domainclip.train")

# mallopt(3) parameter numbers (glibc <malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_KEEP_FREED_BYTES = 2**31 - 1  # trim threshold: in effect "never give freed heap memory back"
_TOP_PAD_BYTES = 64 * 1024 * 1024


def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel.

    Sets the trim threshold out of reach, grows the heap in 64 MiB steps and serves blocks up to
    32 MiB from the heap (larger ones stay mmap-backed). Affects only allocations made after the
    call, in this process and processes forked from it (data-loader workers). Returns False (and
    does nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD), (_M_TOP_PAD, _TOP_PAD_BYTES),
                (_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
    applied = all(mallopt(option, value) == 1 for option, value in settings)
    if not applied:
        log.warning("tune_cpu_allocator: mallopt refused a setting; CPU training keeps the default allocator")
    return applied


def adamw_kwargs(params: Iterable[Any]) -> dict[str, Any]:
    """``{"fused": True}`` when torch has a fused AdamW kernel for every trainable parameter.

    ``params`` are tensors or param-group dicts (``{"params": [...], ...}``) as passed to the
    optimizer. Falls back to ``{}`` (torch's default implementation) for parameters on a device or
    of a dtype the fused kernel does not support, so the caller never has to special-case.
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    tensors: list[torch.Tensor] = []
    for item in params:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    if not tensors:
        return {}
    fusable = all(t.device.type in supported and t.is_floating_point() and not t.is_sparse for t in tensors)
    return {"fused": True} if fusable else {}


def tune_cuda_kernels() -> None:
    """Let cuDNN pick the fastest convolution algorithm for each input shape (the patch embedding
    of a ViT, a ResNet's every layer); results differ from the default choice only by rounding."""
    torch.backends.cudnn.benchmark = True
