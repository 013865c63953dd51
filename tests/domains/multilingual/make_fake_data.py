"""Tiny fake Flickr8k + Multi30k layout: coloured images with parallel captions in en/de/fr/cs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SCENES = [
    ((200, 40, 40), {"en": ["a red car on a street", "a red car"], "de": ["ein rotes Auto auf der Straße"],
                     "fr": ["une voiture rouge dans la rue"], "cs": ["červené auto na ulici"]}),
    ((40, 160, 50), {"en": ["a dog runs on green grass", "a dog on grass"], "de": ["ein Hund rennt über grünes Gras"],
                     "fr": ["un chien court sur l'herbe verte"], "cs": ["pes běží po zelené trávě"]}),
    ((40, 60, 200), {"en": ["a boy swims in blue water", "a swimming boy"], "de": ["ein Junge schwimmt im blauen Wasser"],
                     "fr": ["un garçon nage dans l'eau bleue"], "cs": ["chlapec plave v modré vodě"]}),
    ((220, 200, 40), {"en": ["a yellow taxi waits", "a taxi"], "de": ["ein gelbes Taxi wartet"],
                      "fr": ["un taxi jaune attend"], "cs": ["žluté taxi čeká"]}),
]


def write_parallel(folder: Path, copies: int = 3, size: int = 32, english_only: int = 2, seed: int = 0) -> Path:
    """``folder/images/*.png`` + ``captions.jsonl``; ``english_only`` extra images have no translations."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for copy in range(copies):
        for number, (colour, captions) in enumerate(SCENES):
            name = f"images/{copy}_{number}.png"
            pixels = np.clip(np.array(colour)[None, None] + rng.integers(-25, 25, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
            lines.append({"image": name, "split": "train", "captions": captions})
    for extra in range(english_only):
        name = f"images/extra_{extra}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3)).astype(np.uint8)).save(folder / name)
        lines.append({"image": name, "split": "extra", "captions": {"en": ["a noisy picture"]}})
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path
