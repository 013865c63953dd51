"""Direction words in captions and how flips change them.

From above, orientation carries no meaning for the *scene*, but a caption may describe the
*image*: "a river on the left", "buildings at the top", "the north side". After a horizontal
flip "left" must read "right"; after a vertical flip "top" must read "bottom". 90-degree
rotations and transposes move words across axes ("left" -> "top"), which cannot be rewritten
without changing the sentence's grammar ("on the left" vs "at the top"), so the augmentation
never applies them to a caption with direction words (see ``transforms.py``).

Words handled (whole words, any case; the first letter's case is kept): left/right,
leftmost/rightmost, top/bottom, topmost/bottommost, upper/lower, uppermost/lowermost,
above/below, north/south, northern/southern, east/west, eastern/western and the compass
compounds (northeast, north-east, northwestern...; hyphenated pairs are two words).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

HORIZONTAL_PAIRS = [("left", "right"), ("leftmost", "rightmost"), ("east", "west"), ("eastern", "western"),
                    ("northeast", "northwest"), ("southeast", "southwest"),
                    ("northeastern", "northwestern"), ("southeastern", "southwestern")]
VERTICAL_PAIRS = [("top", "bottom"), ("topmost", "bottommost"), ("upper", "lower"), ("uppermost", "lowermost"),
                  ("above", "below"), ("north", "south"), ("northern", "southern"),
                  ("northeast", "southeast"), ("northwest", "southwest"),
                  ("northeastern", "southeastern"), ("northwestern", "southwestern")]


def _swap_table(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    table: dict[str, str] = {}
    for a, b in pairs:
        table[a], table[b] = b, a
    return table


SWAPS = {"hflip": _swap_table(HORIZONTAL_PAIRS), "vflip": _swap_table(VERTICAL_PAIRS)}
DIRECTION_WORDS = frozenset(SWAPS["hflip"]) | frozenset(SWAPS["vflip"])
_WORD = re.compile(r"[A-Za-z]+")


def has_direction_words(caption: str) -> bool:
    """Whether ``caption`` names an image direction that a flip or rotation would contradict."""
    return any(match.group(0).lower() in DIRECTION_WORDS for match in _WORD.finditer(caption))


def _keep_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    return replacement.capitalize() if original[0].isupper() else replacement


def rewrite_caption(caption: str, flips: Iterable[str]) -> str:
    """``caption`` as it reads after the ``flips`` (``"hflip"``, ``"vflip"``) are applied in order."""
    for flip in flips:
        if flip not in SWAPS:
            raise ValueError(f"unknown flip {flip!r}; valid: {sorted(SWAPS)}")
        table = SWAPS[flip]
        caption = _WORD.sub(lambda m: _keep_case(m.group(0), table[m.group(0).lower()])
                            if m.group(0).lower() in table else m.group(0), caption)
    return caption
