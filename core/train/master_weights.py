"""bf16 weights with fp32 master copies: ``train.bf16_weights``.

Under bf16 autocast every matrix is cast from fp32 to bf16 at every call, forward and backward,
and its gradient arrives in fp32. Holding the matrices in bf16 removes those casts; the optimizer
keeps stepping fp32 *master* copies, so small updates are not lost to bf16 rounding.

Which parameters: the matrices that autocast would cast anyway (weights of ``nn.Linear`` and
convolutions, ``nn.MultiheadAttention``'s packed input projection, open_clip's 2-D ``proj`` /
``text_projection``). Embedding tables, positional embeddings, norms, biases and the logit scale
stay fp32: they are not consumed by a bf16 matmul, and keeping them fp32 keeps the residual stream
and the normalisations in fp32 as autocast does. A frozen text tower whose features are cached
stays fp32 too: it runs only to fill the cache, outside autocast, as in an autocast run. The
forward still runs under autocast (norms, softmax and the loss in fp32), so the computed result is
autocast's: the bf16 copy of a matrix equals what autocast would have cast it to. open_clip's text
towers choose their residual stream's dtype from a block's weight (``get_cast_dtype``): that
answer is pinned to what it was before the matrices became bf16, so the stream stays fp32 there
too (``CustomTextCLIP`` towers and ``encode_text`` itself, not only the kit's trimmed path).

Gradients reach the bf16 matrices (the micro-batches of an accumulated step add up there, as DDP
reduces them) and are moved into fp32 master gradients before each optimizer step; clipping and
the optimizer act on the fp32 masters, and the new masters are rounded into the bf16 copies after each step. Checkpoints, the
saved model and evaluation see the fp32 masters (:meth:`MasterWeights.full_precision`), so a run
resumes exactly and its weights are saved in fp32 like any other run.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PROJECTION_NAMES = ("proj", "text_projection")


class _PinnedDtype:
    """Stands in for an open_clip ``Transformer.get_cast_dtype`` (picklable, unlike a lambda)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self) -> torch.dtype:
        return self.dtype


def bf16_matrices(model: nn.Module, keep_fp32: Collection[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """The parameters held in bf16 (see the module docstring), each once, by qualified name;
    ``keep_fp32`` names parameters left alone (a cached, frozen text tower)."""
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            matmul_weight = (
                (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and leaf == "weight")
                or (isinstance(module, nn.MultiheadAttention) and leaf == "in_proj_weight")
                or (param.ndim == 2 and leaf in PROJECTION_NAMES))
            name = f"{module_name}.{leaf}" if module_name else leaf
            if matmul_weight and param.dtype == torch.float32 and name not in keep_fp32:
                chosen.setdefault(id(param), (name, param))
    return list(chosen.values())


class MasterWeights:
    """The bf16 working copies of a model's matrices and their fp32 masters.

    Build it before the optimizer and before ``accelerator.prepare`` (DDP buckets gradients by the
    parameters' dtype), then build the optimizer on :meth:`param_groups`.
    """

    def __init__(self, model: nn.Module, keep_fp32: Collection[str] = ()):
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.names: list[str] = []
        self._master_of: dict[int, torch.Tensor] = {}
        # the stream dtype open_clip reads from a block's weight, before that weight becomes bf16
        self._pinned = [module for module in model.modules() if callable(getattr(module, "get_cast_dtype", None))]
        dtypes = [module.get_cast_dtype() for module in self._pinned]
        for name, param in bf16_matrices(model, keep_fp32):
            master = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            param.data = param.data.to(torch.bfloat16)
            self.pairs.append((param, master))
            self.names.append(name)
            self._master_of[id(param)] = master
        if not self.pairs:
            raise ValueError("train.bf16_weights: the model has no Linear / convolution / projection matrix to hold "
                             "in bf16")
        for module, dtype in zip(self._pinned, dtypes):
            module.get_cast_dtype = _PinnedDtype(dtype)
        self._full_precision = False

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` with every bf16 matrix replaced by its fp32 master."""
        return [{**group, "params": [self._master_of.get(id(p), p) for p in group["params"]]} for group in groups]

    def collect_grads(self) -> None:
        """Move the bf16 gradients into the fp32 master gradients (once per optimizer step; the
        optimizer's ``zero_grad(set_to_none=True)`` clears the masters' after it)."""
        for param, master in self.pairs:
            if param.grad is not None:
                master.grad = param.grad.float()
                param.grad = None

    def push(self) -> None:
        """Round the fp32 masters into the bf16 working copies (after an optimizer step)."""
        with torch.no_grad():
            for param, master in self.pairs:
                if param.requires_grad:
                    param.data.copy_(master)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """The model's matrices are the fp32 masters inside the block (checkpoints, loading one,
        evaluation); what is loaded into them there is kept, and the bf16 copies follow after."""
        if self._full_precision:
            yield
            return
        self._full_precision = True
        for param, master in self.pairs:
            param.data = master.data
        try:
            yield
        finally:
            for param, master in self.pairs:
                param.data = master.data.to(torch.bfloat16)
            self._full_precision = False

    def release(self) -> None:
        """End of training: the model keeps the fp32 masters for good."""
        for param, master in self.pairs:
            param.data = master.data
        for module in self._pinned:
            if isinstance(module.__dict__.get("get_cast_dtype"), _PinnedDtype):
                del module.get_cast_dtype  # the class's own method again
        self.pairs, self._master_of, self._pinned = [], {}, []
