"""The token-merging setting: which algorithm, how much (``r`` or a FLOP ratio), and when."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ALGORITHMS = ("tome", "pitome")


@dataclass
class TokenMergingConfig:
    """Merge similar image tokens inside the image tower's transformer blocks.

    Attributes:
        algorithm: ``tome`` (bipartite soft matching, Bolya et al. 2023) or ``pitome`` (an
            energy score keeps informative tokens out of the merge, Tran et al. 2024).
        r: tokens merged away in each block (fewer where a block has too few tokens left);
            0 = no merging (the model is exactly the unmerged one).
        flop_ratio: instead of ``r``: the smallest constant ``r`` whose estimated image-tower
            FLOPs are at most this fraction of the unmerged tower's (0 = use ``r``).
        train: also merge during training (otherwise only where images are encoded for
            evaluation, zero-shot classification, the feature cache and ONNX export).
    """

    algorithm: str = "tome"
    r: int = 0
    flop_ratio: float = 0.0
    train: bool = False

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            import difflib

            close = difflib.get_close_matches(str(self.algorithm), ALGORITHMS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"token_merging.algorithm {self.algorithm!r} is not one of {list(ALGORITHMS)}{hint}")
        if self.r < 0:
            raise ValueError(f"token_merging.r must be >= 0, got {self.r}")
        if not 0.0 <= self.flop_ratio <= 1.0:
            raise ValueError(f"token_merging.flop_ratio must be in (0, 1] (0 = use r), got {self.flop_ratio}")
        if self.train and not self.active:
            raise ValueError("token_merging.train: true needs r > 0 or a flop_ratio (nothing would be merged)")
        if self.r and self.flop_ratio:
            raise ValueError(f"token_merging: set r ({self.r}) or flop_ratio ({self.flop_ratio}), not both")

    @property
    def active(self) -> bool:
        return bool(self.r or self.flop_ratio)

    def key(self) -> dict[str, Any]:
        """What image features depend on (the feature cache and ONNX metadata record it)."""
        values = asdict(self)
        values.pop("train")
        return values

    @classmethod
    def parse(cls, text: str) -> "TokenMergingConfig":
        """``tome:8`` (r = 8), ``pitome:flops=0.6``, ``tome:0`` (none): the command-line form."""
        algorithm, _, amount = str(text).partition(":")
        if not amount:
            raise ValueError(f"token merging {text!r}: expected ALGORITHM:R or ALGORITHM:flops=RATIO, e.g. tome:8")
        try:
            if amount.startswith("flops="):
                return cls(algorithm=algorithm, flop_ratio=float(amount[len("flops="):]))
            return cls(algorithm=algorithm, r=int(amount))
        except ValueError as error:
            raise ValueError(f"token merging {text!r}: {error}") from None
