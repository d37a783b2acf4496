"""An uploaded image, checked and decoded on the HTTP side before it is queued: a bad upload
is answered with a 4xx at once and never reaches a batch (where LitServe would fail the
whole batch with it). Decoding runs in a small thread pool, off the event loop (Decoder)."""
from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.readers import resize_center, to_array
from ..untrusted import shown

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
    named = shown(kind[:60]) if kind else "none"
    raise BadInput(415, f"content type {named} is not an image: send the image's bytes with an "
                        f"image content type (image/png, image/jpeg, image/webp) or as "
                        f"multipart/form-data")


class Elsewhere(Exception):
    """decode_image(..., at_most=n) found more than n pixels: decode it in the pool."""


def decode_image(data: bytes, pre: dict[str, Any], max_pixels: int,
                 at_most: int | None = None) -> np.ndarray:
    """Image bytes -> uint8 (C, size, size) as the model's preprocessing resizes and crops
    them (the same steps as `resnetkit predict`). The pixel count is read from the header
    and checked before any pixel is decoded (decompression bombs). Raises BadInput, or
    Elsewhere for an image over `at_most` pixels (where given)."""
    if not data:
        raise BadInput(400, "the upload is empty: send an image file")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadInput(413, f"the image is {w}x{h} = {w * h:,} pixels, over the "
                                    f"server's limit of {max_pixels:,} (--max-image-pixels)")
            if at_most is not None and w * h > at_most:
                raise Elsewhere
            img.load()
            img = resize_center(img, pre["image_size"], pre["resize"], pre["interpolation"])
            arr = to_array(img, pre["in_chans"])
    except (BadInput, Elsewhere):
        raise
    except Image.DecompressionBombError:
        raise BadInput(413, "the image is too large to decode safely") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        reason = (f"not one of {', '.join(FORMATS)}" if isinstance(e, UnidentifiedImageError)
                  else f"damaged or truncated ({shown(str(e)[:120])})")
        raise BadInput(400, f"the upload cannot be decoded as an image: {reason}") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


PIXEL_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (its alpha dropped, as an uploaded file's)


def prepare_pixels(pixels: np.ndarray, pre: dict[str, Any]) -> np.ndarray:
    """Decoded uint8 (H, W, C) pixels -> uint8 (C, size, size), resized and cropped as an
    uploaded image is (decode_image)."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    img = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode)
    img = resize_center(img, pre["image_size"], pre["resize"], pre["interpolation"])
    return np.ascontiguousarray(to_array(img, pre["in_chans"]).transpose(2, 0, 1))


# Uploads decoded on the event loop itself: at most this many bytes and pixels. A 28x28 PNG
# is under 1 KB and decodes in about 40 us, a thread's round trip costs about 35 us more of
# the HTTP process's CPU (0.30 ms per request in all on a small model). Anything larger goes
# to the pool: a 35 KB PNG can hold 36 million pixels, and even the header of a PNG is not
# free (Pillow inflates its text chunks on open, up to about 1,000 times their size: 2 KB of
# them cost the event loop about 2 ms).
INLINE_BYTES = 2 << 10
INLINE_PIXELS = 128 * 128
# Decoding threads in the HTTP process. Pillow leaves the GIL while it inflates and resizes,
# so the event loop answers while a thread decodes. One: the process is given one core
# (server.py), which one thread fills; measured on the 2-core machine with 20 clients
# sending 4000x4000 PNGs (70 ms each), one thread answered 93 in 4 s with /health at most
# 24 ms, two 86 with 41 ms. The cost: an image waits for the decodes ahead of it (a 6000x6000
# PNG takes 170 ms), and only one decoded image (up to --max-image-pixels x channels bytes)
# is held at a time.
DECODE_THREADS = 1


class Decoder:
    """Uploads -> model inputs (decode_image), the small ones in place and the others in a
    pool of `threads` threads; how many wait for a thread is bounded by the caller (the
    queue limit, routes.Predictor)."""

    def __init__(self, pre: dict[str, Any], max_pixels: int, threads: int = DECODE_THREADS):
        self.pre, self.max_pixels, self.threads = pre, max_pixels, threads
        self.pool: ThreadPoolExecutor | None = None

    async def __call__(self, data: bytes) -> np.ndarray:
        """The decoded image; raises BadInput."""
        if len(data) <= INLINE_BYTES:
            try:
                return decode_image(data, self.pre, self.max_pixels, at_most=INLINE_PIXELS)
            except Elsewhere:
                pass
        if self.pool is None:  # made in the process that serves: threads do not survive a fork
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, decode_image, data, self.pre, self.max_pixels)

    async def pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded (H, W, C) pixels as the model's input (prepare_pixels); large ones in
        the pool."""
        if pixels.shape[0] * pixels.shape[1] <= INLINE_PIXELS:
            return prepare_pixels(pixels, self.pre)
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, prepare_pixels, pixels, self.pre)
