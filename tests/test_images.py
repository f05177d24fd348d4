"""Decoding one image (data/images.py), through load_dataset: every bad file set aside with
its reason, common formats, odd modes, bit depth, EXIF orientation, reduced JPEG decoding
and resizing without cropping."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from minnorm_audit.data import load_dataset
from helpers import image_bytes, noisy_rgb, save_image, set_aside_reasons, solid

IMAGE_SIZE = 16


# --------------------------------------------------------------------------- bad items


def test_every_bad_item_is_set_aside_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = solid((10, 20, 30), (8, 8))  # 64 pixels: under the lowered limit below
    save_image(tmp_path / "a" / "good.png", good)
    save_image(tmp_path / "b" / "good.png", good)
    png, jpeg = image_bytes(noisy_rgb((32, 32)), "PNG"), image_bytes(noisy_rgb((32, 32)), "JPEG")
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "a" / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "a" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "a" / "garbage.png").write_bytes(np.random.default_rng(1).bytes(200))
    broken = bytearray(png)
    broken[len(png) // 2 : len(png) // 2 + 40] = bytes(40)  # valid header, mangled pixel data
    (tmp_path / "a" / "broken.png").write_bytes(bytes(broken))
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    # A valid EPS header: Pillow could open it, but only by running Ghostscript on it.
    (tmp_path / "b" / "page.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both must be set aside.
    save_image(tmp_path / "b" / "bomb_warn.png", solid((0, 0, 0), (60, 60)))  # 3,600 pixels
    save_image(tmp_path / "b" / "bomb_error.png", solid((0, 0, 0), (100, 100)))  # 10,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000)

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.sources == ["a/good.png", "b/good.png"]
    reasons = set_aside_reasons(dataset)
    assert reasons["a/zero.png"] == "zero-byte file"
    assert reasons["a/cut.png"] == "truncated image"
    assert reasons["a/cut.jpg"] == "truncated image"
    assert reasons["a/garbage.png"] == "cannot identify image file"
    assert reasons["a/broken.png"].startswith("cannot decode image (")
    assert reasons["b/notes.txt"] == "cannot identify image file"
    assert reasons["b/page.eps"] == "cannot identify image file"
    assert "decompression-bomb" in reasons["b/bomb_warn.png"]
    assert "decompression-bomb" in reasons["b/bomb_error.png"]
    assert len(reasons) == 9


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".bmp", ".tiff", ".webp", ".ppm", ".tga"])
def test_common_formats_load(tmp_path: Path, suffix: str) -> None:
    save_image(tmp_path / "a" / f"image{suffix}", solid((200, 100, 50)))
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.set_aside == [] and dataset.sources[0] == f"a/image{suffix}"
    assert dataset.inputs[0, :, 0, 0].tolist() == pytest.approx([200, 100, 50], abs=8)


def _palette_image(with_transparency: bool) -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 255, 0] + [255, 0, 0] * 255)  # index 0 green, the rest red
    if with_transparency:
        image.info["transparency"] = 0
    return image


# (mode name, image factory, file suffix, expected RGB of the uniform result)
ODD_MODES = [
    ("P", lambda: _palette_image(False), ".png", (0, 255, 0)),
    ("P+transparency", lambda: _palette_image(True), ".png", (255, 255, 255)),
    ("RGBA", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), ".png", (255, 255, 255)),
    ("RGBA opaque", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 255)), ".png", (255, 0, 0)),
    ("LA", lambda: Image.new("LA", (8, 8), (0, 0)), ".png", (255, 255, 255)),
    ("L", lambda: Image.new("L", (8, 8), 77), ".png", (77, 77, 77)),
    ("1", lambda: Image.new("1", (8, 8), 1), ".png", (255, 255, 255)),
    ("I;16", lambda: Image.fromarray(np.full((8, 8), 4095, dtype=np.uint16)), ".png", (16, 16, 16)),
    ("I", lambda: Image.fromarray(np.full((8, 8), 70_000, dtype=np.int32)), ".tiff", (255, 255, 255)),
    ("F", lambda: Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), ".tiff", (128, 128, 128)),
    ("CMYK", lambda: Image.new("CMYK", (8, 8), (255, 0, 0, 0)), ".tiff", (0, 255, 255)),
    ("CMYK jpeg", lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), ".jpg", (255, 255, 255)),
]


@pytest.mark.parametrize(("mode", "factory", "suffix", "expected_rgb"), ODD_MODES, ids=[m[0] for m in ODD_MODES])
def test_odd_modes_decode_to_rgb_uint8(
    tmp_path: Path, mode: str, factory: Callable[[], Image.Image], suffix: str, expected_rgb: tuple[int, int, int]
) -> None:
    save_image(tmp_path / "odd" / f"image{suffix}", factory())
    save_image(tmp_path / "plain" / "image.png", solid((1, 2, 3)))

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.set_aside == []
    assert dataset.inputs.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and dataset.inputs.dtype == torch.uint8
    odd = dataset.inputs[dataset.sources.index(f"odd/image{suffix}")]
    per_channel = odd.reshape(3, -1)
    assert (per_channel.amin(dim=1) == per_channel.amax(dim=1)).all(), "a uniform image stays uniform"
    assert per_channel[:, 0].tolist() == pytest.approx(list(expected_rgb), abs=2)


def test_sixteen_bit_uses_the_format_scale_not_the_image_maximum(tmp_path: Path) -> None:
    ramp = np.zeros((8, 8), dtype=np.uint16)
    ramp[:, 4:] = 4000  # 12-bit data in a 16-bit container: dark (4000 / 257), as in every other image
    save_image(tmp_path / "a" / "ramp.png", Image.fromarray(ramp))
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    pixels = load_dataset(tmp_path, image_size=8).inputs[0]

    assert pixels[:, :, 0].max() == 0 and pixels[:, :, -1].min() == pixels[:, :, -1].max() == 16


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored landscape: left half red, right half blue. Orientation 6 = rotate 90 degrees
    # clockwise for display, which puts red on top.
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    save_image(tmp_path / "a" / "rotated.jpg", stored, exif=exif, quality=95)
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    pixels = load_dataset(tmp_path, image_size=IMAGE_SIZE).inputs[0].int()

    top, bottom = pixels[:, 2, IMAGE_SIZE // 2], pixels[:, -3, IMAGE_SIZE // 2]
    assert top[0] > 200 and top[2] < 60, "red on top"
    assert bottom[2] > 200 and bottom[0] < 60, "blue at the bottom"


def test_large_jpeg_is_reduced_to_image_size(tmp_path: Path) -> None:
    large = Image.new("RGB", (3000, 2000), (0, 128, 0))
    save_image(tmp_path / "a" / "large.jpg", large)
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.inputs.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert dataset.inputs[0, 1].float().mean() == pytest.approx(128, abs=3)


def test_whole_image_resized_without_cropping(tmp_path: Path) -> None:
    # A wide image with a distinctive stripe at its far right edge: a centre crop would lose it.
    wide = Image.new("RGB", (64, 16), (0, 0, 0))
    wide.paste((255, 255, 255), (48, 0, 64, 16))
    save_image(tmp_path / "a" / "wide.png", wide)
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    pixels = load_dataset(tmp_path, image_size=8).inputs[0]

    assert pixels[0, :, -1].min() > 200 and pixels[0, :, 0].max() == 0
