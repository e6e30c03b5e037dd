"""Decoding policy (issue 3, "Hostile and odd input"): every Pillow mode becomes correct 8-bit RGB,
bad files are refused with a reason instead of crashing or being silently filled in."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import png_claiming_size, truncated_jpeg_bytes
from PIL import Image

from featcache.pipeline.extraction.images import IMAGE_POLICY, UnreadableImage, load_rgb, to_rgb


def px(img: Image.Image, x: int = 0, y: int = 0) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return tuple(int(v) for v in np.asarray(img)[y, x])


def test_rgb_passthrough_png_and_jpeg(tmp_path):
    Image.new("RGB", (5, 4), (10, 120, 250)).save(tmp_path / "a.png")
    out = load_rgb(str(tmp_path / "a.png"))
    assert out.size == (5, 4) and px(out) == (10, 120, 250)
    Image.new("RGB", (16, 16), (10, 120, 250)).save(tmp_path / "a.jpg", quality=95)
    out = load_rgb(str(tmp_path / "a.jpg"))
    assert out.size == (16, 16)
    assert np.abs(np.asarray(out, np.int32) - (10, 120, 250)).max() <= 3


def test_grayscale_L(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "l.png")
    out = load_rgb(str(tmp_path / "l.png"))
    assert out.size == (4, 3)
    assert px(out) == (77, 77, 77)


def test_LA_composites_on_white(tmp_path):
    im = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent -> background
    im.putpixel((1, 1), (0, 255))  # black, opaque -> black
    im.putpixel((2, 2), (0, 128))  # black, half transparent -> mid grey
    im.save(tmp_path / "la.png")
    out = load_rgb(str(tmp_path / "la.png"))
    assert px(out, 0, 0) == (255, 255, 255)
    assert px(out, 1, 1) == (0, 0, 0)
    assert all(abs(v - 127) <= 1 for v in px(out, 2, 2))


def _palette(mode_pixel: int) -> Image.Image:
    p = Image.new("P", (4, 4), mode_pixel)
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * (768 - 6))
    return p


def test_palette_with_transparency_composites_like_alpha(tmp_path):
    p = _palette(0)
    p.putpixel((3, 3), 1)
    p.save(tmp_path / "p.png", transparency=0)  # palette index 0 is transparent
    assert Image.open(tmp_path / "p.png").info.get("transparency") == 0
    out = load_rgb(str(tmp_path / "p.png"))
    assert px(out, 0, 0) == (255, 255, 255)  # transparent index -> white, not its palette colour
    assert px(out, 3, 3) == (200, 0, 0)


def test_palette_without_transparency_uses_palette_colours(tmp_path):
    _palette(0).save(tmp_path / "p.png")
    assert px(load_rgb(str(tmp_path / "p.png"))) == (10, 20, 30)


def test_RGBA_composites_on_white_background(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    im.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue -> pure white
    im.putpixel((2, 0), (0, 255, 0, 255))
    im.save(tmp_path / "rgba.png")
    out = load_rgb(str(tmp_path / "rgba.png"))
    r, g, b = px(out, 0, 0)
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    assert px(out, 1, 0) == (255, 255, 255)
    assert px(out, 2, 0) == (0, 255, 0)
    assert "255, 255, 255" in IMAGE_POLICY["alpha"]


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_CMYK_converted(tmp_path, ext):
    path = tmp_path / f"cmyk.{ext}"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # C=0 M=Y=full: red
    assert Image.open(path).mode == "CMYK"
    r, g, b = px(load_rgb(str(path)), 8, 8)
    assert r >= 250 and g <= 5 and b <= 5


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    arr = np.zeros((4, 6), np.uint16)
    arr[0, :] = 32768  # half of the 16-bit range -> ~128, not 255
    arr[1, :] = 65535
    arr[2, :] = 1000  # ~4; clipping convert('L') would give 255 (white)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_rgb(str(tmp_path / "g16.png"))
    assert px(out, 0, 0) == (128, 128, 128)
    assert px(out, 0, 1) == (255, 255, 255)
    assert px(out, 0, 2) == (4, 4, 4)
    assert px(out, 0, 3) == (0, 0, 0)


def test_to_rgb_mode_I_and_F():
    i = Image.fromarray(np.full((2, 2), 65535, np.int32), "I")
    assert px(to_rgb(i)) == (255, 255, 255)
    f = Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")  # float images in [0, 1]
    assert px(to_rgb(f)) == (128, 128, 128)


def _exif_jpeg(path, orientation: int):
    """A 40x20 JPEG, left half red, right half blue, with EXIF Orientation set."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def test_exif_orientation_6_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    _exif_jpeg(path, 6)  # 6 = rotate 90 degrees clockwise to display
    raw = Image.open(path)
    assert raw.size == (40, 20) and raw.getexif()[0x0112] == 6
    out = load_rgb(str(path))
    assert out.size == (20, 40)  # width and height swapped
    top, bottom = np.asarray(out)[3, 10].astype(int), np.asarray(out)[36, 10].astype(int)
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_exif_orientation_3_is_applied(tmp_path):
    path = tmp_path / "rot180.jpg"
    _exif_jpeg(path, 3)  # 3 = rotate 180
    out = np.asarray(load_rgb(str(path))).astype(int)
    assert out.shape == (20, 40, 3)
    assert out[10, 5][2] > 200 and out[10, 35][0] > 200  # blue now on the left, red on the right


def test_truncated_jpeg_is_rejected(tmp_path):
    path = tmp_path / "trunc.jpg"
    path.write_bytes(truncated_jpeg_bytes(np.random.default_rng(0)))
    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb(str(path))
    # and the global Pillow switch that would fill it with grey stays off
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert IMAGE_POLICY["truncated"] == "rejected"


def test_truncated_and_corrupt_png_are_rejected(tmp_path):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb(str(tmp_path / "half.png"))
    broken = bytearray(data)
    broken[40] ^= 0xFF  # inside the first chunk: its CRC no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(broken))
    with pytest.raises(UnreadableImage):
        load_rgb(str(tmp_path / "crc.png"))


def test_decompression_bomb_is_rejected(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(100_000, 100_000))  # 10^10 pixels: DecompressionBombError
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        load_rgb(str(path))


def test_image_between_limit_and_twice_limit_is_rejected_too(tmp_path):
    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; the product treats it as a bomb.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    path = tmp_path / "bomb_warn.png"
    path.write_bytes(png_claiming_size(side, side))
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        load_rgb(str(path))


def test_small_max_pixels_limit_rejects_real_image(tmp_path, monkeypatch):
    """A real (decodable) image above a tiny limit set only in this process is a bomb."""
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        load_rgb(str(tmp_path / "big.png"))


def test_zero_byte_file_is_rejected(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImage):
        load_rgb(str(tmp_path / "zero.jpg"))


def test_text_file_with_image_extension_is_rejected(tmp_path):
    (tmp_path / "fake.png").write_text("definitely not a png")
    with pytest.raises(UnreadableImage):
        load_rgb(str(tmp_path / "fake.png"))


def test_missing_and_unreadable_files_are_rejected(tmp_path):
    with pytest.raises(UnreadableImage):
        load_rgb(str(tmp_path / "nope.png"))
    (tmp_path / "dir.png").mkdir()  # a folder with an image name
    with pytest.raises(UnreadableImage):
        load_rgb(str(tmp_path / "dir.png"))


def test_reasons_are_non_empty_strings(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImage) as info:
        load_rgb(str(tmp_path / "zero.jpg"))
    assert str(info.value).strip()
