"""An uploaded image, checked and decoded on the HTTP side before it is queued: a bad upload
is answered with a 4xx at once and never reaches a batch (where LitServe would fail the
whole batch with it)."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.readers import resize_center, to_array

# what /predict takes as a raw body; multipart/form-data carries the same in a file field
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif",
               "image/tiff", "application/octet-stream")
# the formats Pillow may decode from the network, whatever the declared type: not the
# others it knows (EPS and PostScript would run Ghostscript where it is installed)
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class BadInput(Exception):
    """An upload the server refuses: an HTTP status and one sentence for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def media_type(content_type: str | None) -> str:
    """"image/png; charset=x" -> "image/png"."""
    return (content_type or "").split(";")[0].strip().lower()


def check_type(content_type: str | None) -> str:
    """The media type if /predict takes it (a raw image or multipart), else BadInput 415."""
    kind = media_type(content_type)
    if kind == "multipart/form-data" or kind in IMAGE_TYPES:
        return kind
    shown = kind or "none"
    raise BadInput(415, f"content type {shown} is not an image: send the image's bytes with an "
                        f"image content type (image/png, image/jpeg, image/webp) or as "
                        f"multipart/form-data")


def decode_image(data: bytes, pre: dict[str, Any], max_pixels: int) -> np.ndarray:
    """Image bytes -> uint8 (C, size, size) as the model's preprocessing resizes and crops
    them (the same steps as `resnetkit predict`). The pixel count is read from the header
    and checked before any pixel is decoded (decompression bombs). Raises BadInput."""
    if not data:
        raise BadInput(400, "the upload is empty: send an image file")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadInput(413, f"the image is {w}x{h} = {w * h:,} pixels, over the "
                                    f"server's limit of {max_pixels:,} (--max-image-pixels)")
            img.load()
            img = resize_center(img, pre["image_size"], pre.get("resize", 0),
                                pre.get("interpolation", "bilinear"))
            arr = to_array(img, pre.get("in_chans", 3))
    except BadInput:
        raise
    except Image.DecompressionBombError:
        raise BadInput(413, "the image is too large to decode safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        reason = (f"not one of {', '.join(FORMATS)}" if isinstance(e, UnidentifiedImageError)
                  else f"damaged or truncated ({e})")
        raise BadInput(400, f"the upload cannot be decoded as an image: {reason}") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
