"""Projected gradient descent (Madry et al. 2018) in the L-infinity ball, on [0, 1] pixels."""
from __future__ import annotations

from collections.abc import Callable

import torch


def pgd_linf(loss_fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, eps: float, steps: int,
             step_size: float, random_start: bool = True, generator: torch.Generator | None = None,
             start_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels within ``eps`` (L-infinity) of ``pixels`` and inside [0, 1] that raise ``loss_fn``.

    Args:
        loss_fn: pixels (B, C, H, W) -> per-image losses (B,) to be increased; gradients flow
            only to the pixels (the model's parameters get no ``.grad``).
        pixels: clean images in [0, 1].
        eps, step_size: radius and step, in pixel units (4/255, not 4).
        steps: signed-gradient ascent steps, each projected back onto the ball and [0, 1].
        random_start: start at a uniform random point of the ball.
        generator: the random start's generator (CPU); None uses the global RNG, whose state a
            training checkpoint saves, so a resumed run draws the same starts.
        start_noise: uniform [0, 1) noise of ``pixels``' shape for the random start, drawn by the
            caller (per image, so an image's start does not depend on its batch); overrides
            ``generator``.

    ``eps == 0`` or ``steps == 0`` without a random start returns ``pixels`` unchanged.
    """
    if eps < 0 or step_size < 0 or steps < 0:
        raise ValueError(f"pgd_linf needs eps, step_size and steps >= 0, got {eps}, {step_size}, {steps}")
    pixels = pixels.detach()
    if eps == 0 or (steps == 0 and not random_start):
        return pixels.clone()
    if random_start:
        if start_noise is not None:
            noise = start_noise.to(pixels.device, pixels.dtype)
        elif generator is not None:
            noise = torch.rand(pixels.shape, generator=generator, dtype=pixels.dtype).to(pixels.device)
        else:
            noise = torch.rand_like(pixels)
        delta = _project(pixels, (2 * noise - 1) * eps, eps)
    else:
        delta = torch.zeros_like(pixels)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(pixels + delta)
            if loss.ndim != 1 or loss.shape[0] != pixels.shape[0]:
                raise ValueError(f"loss_fn must return one loss per image ({pixels.shape[0]},), got {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss.sum(), delta)
        delta = _project(pixels, delta.detach() + step_size * grad.sign(), eps)
    return (pixels + delta).detach()


def _project(pixels: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """``delta`` clipped to the ball, then so that ``pixels + delta`` stays in [0, 1]."""
    delta = delta.clamp(-eps, eps)
    return (pixels + delta).clamp(0.0, 1.0) - pixels
