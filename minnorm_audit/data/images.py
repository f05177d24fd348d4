"""One image file to pixels: uint8 RGB ``(3, S, S)``, or the reason it is set aside.

Only the raster formats of ``IMAGE_FORMATS`` are tried. Multi-frame files give their
first frame; palette, gray, CMYK, 1-bit and 16-bit/float images become RGB
(transparency composited onto white, high bit depths brought to 8 bits by one scale
per format, never per image: see :func:`_high_depth_to_uint8`);
EXIF orientation is applied; JPEGs much larger than ``S`` are decoded at a reduced
scale; Pillow's decompression-bomb limit stays on. :func:`prescan_image_file` is the
cheap check used instead of a full decode when the images are streamed.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow modes holding more than 8 bits per pixel; they are scaled down to 8 bits.
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Float pixels within [-UNIT_TOLERANCE, 1 + UNIT_TOLERANCE] are [0, 1] data (a value
# like 1.0001 is rounding, not a different scale); they are clipped to [0, 1]. The
# in-memory loaders (memory.py) use the same tolerance.
UNIT_TOLERANCE = 0.01
# 16-bit to 8-bit: 65535 / 255. A 16-bit value v * 257 becomes v, as in the 8-bit copy.
SIXTEEN_BIT_DIVISOR = 257.0
# Raster formats Pillow may try. Not "any format": EPS would hand a file from DATA to
# Ghostscript, and the rarer decoders (WMF, PSD, FITS, ...) are more attack surface than use.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "PPM", "TGA", "ICO", "JPEG2000", "QOI")


@dataclass(frozen=True)


class _DecodedImage:
    """One file's outcome: pixels (3, S, S) or the reason it was set aside.

    A streamed (pre-scanned, not decoded) readable file has ``pixels`` None,
    ``reason`` None and its ``file_path``.
    """

    pixels: np.ndarray | None
    reason: str | None
    content_sha256: bytes
    file_path: Path | None = None


def _decode_image_file(file_path: Path, image_size: int) -> _DecodedImage:
    """Read one file and decode it to uint8 (3, S, S), or say why it cannot be used."""
    special = _not_regular_file(file_path)
    if special is not None:
        return _DecodedImage(None, special, b"")
    try:
        content = file_path.read_bytes()  # read-only; one read serves both hash and decode
    except FileNotFoundError:
        return _DecodedImage(None, "file not found", b"")
    except IsADirectoryError:
        return _DecodedImage(None, "not a file", b"")
    except OSError as err:
        return _DecodedImage(None, f"cannot read file ({err.strerror or err})", b"")
    content_sha256 = hashlib.sha256(content).digest()
    if not content:
        return _DecodedImage(None, "zero-byte file", content_sha256)
    try:
        pixels = _decode_image_bytes(content, image_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _DecodedImage(None, "over Pillow's decompression-bomb pixel limit", content_sha256)
    except UnidentifiedImageError:
        return _DecodedImage(None, "cannot identify image file", content_sha256)
    except Exception as err:  # noqa: BLE001 - one bad file must never stop the run; the reason keeps what happened
        return _DecodedImage(None, _describe_decode_error(err), content_sha256)
    return _DecodedImage(pixels, None, content_sha256)


def _not_regular_file(file_path: Path) -> str | None:
    """Why ``file_path`` is not read (checked with stat, before any open: a named pipe
    would block the read forever, a device such as /dev/zero never ends), or None for
    a regular file. Symlinks are followed, so a link to a device is refused too."""
    try:
        mode = os.stat(file_path).st_mode
    except FileNotFoundError:
        return None  # the read reports it
    except OSError as err:
        return f"cannot read file ({err.strerror or type(err).__name__})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None  # a folder: the read reports "not a file"
    kind = ("named pipe (FIFO)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device file" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
    return f"not a regular file (a {kind}); not opened"


def _describe_decode_error(err: Exception) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    if "truncated" in message.lower():
        return "truncated image"
    if isinstance(err, MemoryError):
        return "out of memory while decoding"
    return f"cannot decode image ({message[:100]})"


def _decode_image_bytes(content: bytes, image_size: int) -> np.ndarray:
    """Decode image bytes to uint8 (3, image_size, image_size), see load_dataset's Notes."""
    target = (image_size, image_size)
    with Image.open(io.BytesIO(content), formats=IMAGE_FORMATS) as opened:
        _check_pixel_limit(opened)
        # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale, never below the target.
        opened.draft(None, target)
        opened.load()
        image = _apply_exif_orientation(opened)  # stays inside `with`: it may be `opened` itself
        if image.mode in _HIGH_DEPTH_MODES:
            # Resize in float before scaling to 8 bits, so the 16-bit precision feeds the average.
            as_float = image.convert("F").resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
            gray = _high_depth_to_uint8(np.asarray(as_float, dtype=np.float32), image.mode)
            return np.broadcast_to(gray, (3, image_size, image_size)).copy()
        rgb = _to_rgb(image).resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def prescan_image_file(file_path: Path) -> tuple[str | None, bytes]:
    """Cheap check of one file before streaming: ``(reason or None, content sha256)``.

    The file is read once (its hash goes into the dataset fingerprint, as in the eager
    loader) and opened header-only; PNG and the other formats Pillow can verify are
    verified (CRCs, truncation), a JPEG is decoded at 1/8 scale (catches truncation).
    Nothing is kept but the hash.
    """
    special = _not_regular_file(file_path)
    if special is not None:
        return special, b""
    try:
        content = file_path.read_bytes()
    except FileNotFoundError:
        return "file not found", b""
    except IsADirectoryError:
        return "not a file", b""
    except OSError as err:
        return f"cannot read file ({err.strerror or err})", b""
    content_sha256 = hashlib.sha256(content).digest()
    if not content:
        return "zero-byte file", content_sha256
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content), formats=IMAGE_FORMATS) as opened:
                _check_pixel_limit(opened)
                if opened.format == "JPEG":
                    opened.draft(None, (max(1, opened.width // 8), max(1, opened.height // 8)))
                    opened.load()
                else:
                    opened.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "over Pillow's decompression-bomb pixel limit", content_sha256
    except UnidentifiedImageError:
        return "cannot identify image file", content_sha256
    except Exception as err:  # noqa: BLE001 - one bad file never stops the run
        return _describe_decode_error(err), content_sha256
    return None, content_sha256


def _check_pixel_limit(image: Image.Image) -> None:
    """Raise for images over Pillow's bomb limit, in case the warning filter did not apply."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels exceeds the limit of {limit}")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost a readable image
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any 8-bit mode to RGB, compositing transparency onto white."""
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Pixels of a high-depth Pillow ``mode`` (as floats) to uint8, by one scale per
    format, never by the image's own range, so that brightness is comparable between
    images (a dark class stays darker than a bright one):

    - 16-bit modes (``I;16*``): divided by 257, so ``v * 257`` reads as ``v``, like the
      image's 8-bit copy. 12-bit data stored in 16 bits comes out dark (up to 16).
    - ``I`` (32-bit signed integers; also 16-bit PNGs in older Pillow): the same 16-bit
      scale; values above 65,535 are white, below 0 black.
    - ``F`` (32-bit float): no single convention exists, so the image's range picks one
      of three fixed scales: [0, 1] (times 255) when its values lie within
      [-UNIT_TOLERANCE, 1 + UNIT_TOLERANCE], else 0..255 (as is) when within
      [0, 255 * (1 + UNIT_TOLERANCE)], else the 16-bit scale. Clipped.

    NaN and infinite pixels become 0.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "F" and values.size and values.min() >= -UNIT_TOLERANCE and values.max() <= 1.0 + UNIT_TOLERANCE:
        scaled = values * 255.0
    elif mode == "F" and values.size and values.min() >= -UNIT_TOLERANCE and values.max() <= 255.0 * (1.0 + UNIT_TOLERANCE):
        scaled = values
    else:
        scaled = values / SIXTEEN_BIT_DIVISOR
    return np.rint(scaled).clip(0, 255).astype(np.uint8)
