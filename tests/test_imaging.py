"""The shared decode/resize function: formats, colour modes, orientation, limits and errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from inference.imaging import ImageDecodeError, decode_image, encode_png, open_image, pillow_pixels, plain_jpeg_size


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def solid(mode: str, color, size=(8, 6)) -> Image.Image:
    return Image.new(mode, size, color)


def test_png_round_trip_is_exact():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_png(pixels), (32, 32)), pixels)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb_uint8(fmt):
    out = decode_image(encode(solid("RGB", (200, 30, 40), (40, 40)), fmt), (32, 32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert abs(int(out[..., 0].mean()) - 200) < 6


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(fmt):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(encode(solid("RGB", (1, 2, 3)), fmt), (32, 32))
    assert err.value.reason == "unsupported_format"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"definitely not an image", "unsupported_format"),
        (b"\x80\x04\x95pickle", "unsupported_format"),
    ],
)
def test_non_images(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, (32, 32))
    assert err.value.reason == reason


def test_truncated_jpeg_is_corrupt():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2], (32, 32))
    assert err.value.reason == "corrupt"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny: a decompression bomb's shape."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageDecodeError) as err:
        decode_image(png_header_only(100_000, 100_000), (32, 32))
    assert err.value.reason == "image_too_large"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(encode(solid("RGB", (0, 0, 0), (100, 100)), "PNG"), (32, 32), max_pixels=9_999)
    assert err.value.reason == "image_too_large"


@pytest.mark.parametrize(
    ("image", "expected_rgb"),
    [
        (solid("L", 128), (128, 128, 128)),
        (solid("RGBA", (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent -> white background
        (solid("RGBA", (255, 0, 0, 255)), (255, 0, 0)),
        (solid("LA", (0, 255)), (0, 0, 0)),
        (solid("I;16", 65535), (255, 255, 255)),  # 16-bit white is scaled, not clipped
        (solid("I;16", 32896), (128, 128, 128)),
    ],
)
def test_colour_modes_follow_the_policy(image, expected_rgb):
    out = decode_image(encode(image, "PNG"), (4, 4))
    assert tuple(int(v) for v in out[0, 0]) == expected_rgb


def test_palette_with_transparency_is_composited_on_white():
    image = solid("P", 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    out = decode_image(encode(image, "PNG", transparency=1), (4, 4))
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb():
    out = decode_image(encode(solid("CMYK", (0, 255, 255, 0), (16, 16)), "JPEG", quality=95), (8, 8))
    red, green, blue = (int(v) for v in out[4, 4])
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied():
    # A 20x10 image, left half red, with EXIF orientation 6 (rotate 90 degrees clockwise to display).
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(image, "PNG", exif=exif), (20, 10))
    # Displayed upright it is 10 wide and 20 tall with red on top; fitting to 20x10 (H x W) keeps all of it.
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 50
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 50


def test_resize_covers_and_centre_crops():
    # 64 wide x 32 tall: left and right quarters green, middle half red -> a centre crop to 32x32 is all red.
    image = Image.new("RGB", (64, 32), (0, 255, 0))
    image.paste((255, 0, 0), (16, 0, 48, 32))
    out = decode_image(encode(image, "PNG"), (32, 32))
    assert out.shape == (32, 32, 3)
    assert (out[:, 1:-1, 0] > 200).all() and (out[:, 1:-1, 1] < 50).all()


def noise_image(mode: str, size=(33, 17)) -> Image.Image:
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize(
    ("mode", "save_args"),
    [
        ("RGB", {}),  # 4:2:0, the default
        ("RGB", {"subsampling": 0, "quality": 95}),  # 4:4:4
        ("RGB", {"subsampling": 1}),  # 4:2:2
        ("RGB", {"progressive": True}),
        ("RGB", {"quality": 30}),
        ("L", {}),
    ],
)
@pytest.mark.parametrize("size", [(17, 33), (8, 8)])  # the image's own (H, W), and a resize
def test_plain_jpegs_take_the_fast_decoder_and_give_pillows_pixels(mode, save_args, size):
    data = encode(noise_image(mode), "JPEG", **save_args)
    assert plain_jpeg_size(data) == (33, 17) and open_image(data).image is None  # simplejpeg's path
    expected = pillow_pixels(Image.open(io.BytesIO(data)), size)
    assert np.array_equal(decode_image(data, size), expected)


def rotated_jpeg() -> bytes:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(image, "JPEG", exif=exif, quality=95)


def damaged_jpeg() -> bytes:
    """A JPEG with a run of zeroed bytes in its image data: libjpeg-turbo warns, Pillow decodes it anyway."""
    data = bytearray(encode(noise_image("RGB", (64, 64)), "JPEG"))
    middle = len(data) // 2
    data[middle : middle + 40] = bytes(40)
    return bytes(data)


@pytest.mark.parametrize("data", [rotated_jpeg(), encode(noise_image("CMYK"), "JPEG")], ids=["exif-rotated", "cmyk"])
def test_other_jpegs_are_left_to_pillow(data):
    assert plain_jpeg_size(data) is None and open_image(data).image is not None
    assert np.array_equal(decode_image(data, (16, 16)), pillow_pixels(Image.open(io.BytesIO(data)), (16, 16)))


def test_damaged_plain_jpeg_is_decoded_as_pillow_decodes_it():
    data = damaged_jpeg()
    assert plain_jpeg_size(data) is not None  # its header is fine; libjpeg-turbo warns on its data
    assert np.array_equal(decode_image(data, (16, 16)), pillow_pixels(Image.open(io.BytesIO(data)), (16, 16)))


def test_plain_jpeg_pixel_limit_is_checked_from_the_header():
    data = encode(noise_image("RGB", (100, 100)), "JPEG")
    assert plain_jpeg_size(data) == (100, 100)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, (32, 32), max_pixels=9_999)
    assert err.value.reason == "image_too_large"


def test_exif_rotated_jpeg_is_turned_upright():
    out = decode_image(rotated_jpeg(), (20, 10))  # displayed 10 wide and 20 tall, red on top
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 50
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 50
