"""The ``robustness:`` section of an eval task with ``task: robustness``."""
from __future__ import annotations

from dataclasses import dataclass, field

TARGETS = ("zeroshot", "retrieval")


@dataclass
class RobustnessConfig:
    """Adversarial (PGD, L-infinity) and corruption robustness of one evaluation split.

    Attributes:
        target: what is attacked and scored: ``zeroshot`` (classification against the
            prompt-ensemble head; needs labels) or ``retrieval`` (image -> text retrieval over
            the split's captions).
        eps: attack radii in pixel steps of 1/255 (``[1, 2, 4]`` = 1/255, 2/255, 4/255), on
            pixels in [0, 1] before the model's mean/std normalisation. 0 = no attack.
        steps: PGD iterations per radius.
        step_size: PGD step in 1/255 units; 0 = ``2.5 * eps / steps`` (Madry et al.).
        random_start: start each attack at a uniform random point of the eps-ball.
        seed: seeds the random starts and the random corruptions (same seed, same numbers).
        corruptions: name of a corruption set (``default`` in core; domains register their own,
            e.g. ``chest_xray`` without flips); empty = no corruptions.
        severity: corruption severity 1..5 (ImageNet-C levels).
    """

    target: str = "zeroshot"
    eps: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    steps: int = 10
    step_size: float = 0.0
    random_start: bool = True
    seed: int = 0
    corruptions: str = "default"
    severity: int = 3

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"robustness.target must be one of {TARGETS}, got {self.target!r}")
        negative = [eps for eps in self.eps if eps < 0]
        if negative:
            raise ValueError(f"robustness.eps values must be >= 0 (units of 1/255), got {self.eps}")
        if len(set(self.eps)) != len(self.eps):
            raise ValueError(f"robustness.eps lists a value twice: {self.eps}")
        if self.steps < 0:
            raise ValueError(f"robustness.steps must be >= 0, got {self.steps}")
        if self.step_size < 0:
            raise ValueError(f"robustness.step_size must be >= 0 (0 = 2.5 * eps / steps), got {self.step_size}")
        if not 1 <= self.severity <= 5:
            raise ValueError(f"robustness.severity must be in 1..5, got {self.severity}")

    def step_of(self, eps: float) -> float:
        """The PGD step for radius ``eps`` (both in 1/255 units)."""
        if self.step_size:
            return self.step_size
        return 2.5 * eps / max(self.steps, 1)


def eps_label(eps: float) -> str:
    """``pgd_eps4`` for 4/255, ``pgd_eps0.5`` for 0.5/255: the suffix of robust metric names."""
    return f"pgd_eps{eps:g}"
