"""Request limits of the service and the image decoding that enforces them.

Every violation is a ``RequestError`` carrying its HTTP status (413 too large, 415 not an image,
422 invalid field, 400 malformed body), turned into a JSON ``{"error": ...}`` answer by the app.
The pixel count is checked from the image header **before** decoding, so a decompression bomb
(a few kilobytes that decode to gigabytes) is refused without allocating its pixels.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..data.dataset import BadImageError, to_rgb


@dataclass
class Limits:
    """What one request may carry.

    Attributes:
        max_image_bytes: size of one uploaded image (after base64 decoding).
        max_pixels: width x height of one image, checked before decoding.
        max_labels: candidate labels of one /classify request.
        max_label_chars: length of one label, template or text.
        max_texts: texts of one /embed request.
        max_images: images of one /embed request.
        max_body_bytes: the whole request body (JSON or multipart), read with this cap.
        max_top_k: hits of one /search request.
    """

    max_image_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_labels: int = 100
    max_label_chars: int = 300
    max_texts: int = 64
    max_images: int = 16
    max_body_bytes: int = 32 * 2**20
    max_top_k: int = 100


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx) and a message naming the field and the limit."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_base64(value: object, field: str, limits: Limits) -> bytes:
    """``value`` (base64 text, optionally a ``data:`` URL) -> bytes, within ``max_image_bytes``."""
    if not isinstance(value, str) or not value:
        raise RequestError(422, f"{field}: expected a base64-encoded image string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestError(413, f"{field}: image is larger than the limit of {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{field}: not valid base64") from None


def decode_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    """Image bytes -> RGB PIL image, refusing oversized files, too many pixels and non-images."""
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"{field}: image is {len(data)} bytes, more than the limit of {limits.max_image_bytes}")
    if not data:
        raise RequestError(422, f"{field}: the image is empty")
    try:  # runs in worker threads: no warnings.catch_warnings (not thread-safe); the size check is ours
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RequestError(413, f"{field}: image is {width}x{height} = {width * height} pixels, more than the "
                                    f"limit of {limits.max_pixels}")
        image.load()
        return to_rgb(image)
    except RequestError:
        raise
    except Image.DecompressionBombError as error:  # past twice PIL's own limit: refused before ours runs
        raise RequestError(413, f"{field}: image has too many pixels ({error})") from None
    except UnidentifiedImageError:
        raise RequestError(415, f"{field}: not an image file (PIL cannot identify it)") from None
    except BadImageError as error:
        raise RequestError(415, f"{field}: {error.reason}") from None
    except Exception as error:  # truncated or corrupt files: OSError, SyntaxError, ValueError...
        raise RequestError(415, f"{field}: cannot decode image: {type(error).__name__}: {error}") from None


def check_strings(values: object, field: str, limit: int, limits: Limits) -> list[str]:
    """A list of 1..``limit`` non-empty strings of at most ``max_label_chars`` each; a string is split on commas."""
    if isinstance(values, str):
        values = [part for part in values.split(",")]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RequestError(422, f"{field}: expected a list of strings (or one comma-separated string)")
    values = [v.strip() for v in values]
    if not values or not any(values):
        raise RequestError(422, f"{field}: give at least one")
    if len(values) > limit:
        raise RequestError(413, f"{field}: {len(values)} given, more than the limit of {limit}")
    if "" in values:
        raise RequestError(422, f"{field}: entry {values.index('')} is empty")
    long = [v for v in values if len(v) > limits.max_label_chars]
    if long:
        raise RequestError(413, f"{field}: {long[0][:40]!r}... is longer than {limits.max_label_chars} characters")
    return values
