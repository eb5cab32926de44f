"""Camera photos in the shared decoder: DCT-scaled JPEG decoding, MPO, HEIC/HEIF, AVIF, transparency in 16-bit and
palette PNGs, ICC profiles (Display P3), and damaged files and header bombs of every accepted format."""

from __future__ import annotations

import importlib.util
import io
import math
import struct
import zlib

import numpy as np
import pytest
import simplejpeg
from PIL import Image, features

from benchmarks.photos import encode
from inference import imaging
from inference.imaging import (
    DCT_SCALE_MARGIN,
    PHOTOS_EXTRA,
    ImageDecodeError,
    dct_scale,
    decode_image,
    open_image,
    pillow_pixels,
    plain_jpeg_size,
    resize_to,
)

needs_heif = pytest.mark.skipif(
    imaging.heif_plugin is None or importlib.util.find_spec("pillow_heif") is None,
    reason="a HEIF decoder (the photos extra) and pillow-heif's encoder (the dev extra) are needed",
)
needs_avif = pytest.mark.skipif(not features.check("avif"), reason="this Pillow build has no AVIF codec")
DECODE_REASONS = {"corrupt", "unsupported_format", "image_too_large"}


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients under noise: detail at every frequency, so a wrong scale or IDCT changes pixels."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 7 % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(-40, 40, base.shape)
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).convert(mode)


def exif_block(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# ---- the DCT scale rule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "size", "scale"),
    [
        (32, 32, (32, 32), 1),  # CIFAR: decoded as ever
        (300, 300, (32, 32), 1),  # 1/2 would leave 150 < 192
        (383, 900, (32, 32), 2),  # ceil(383 / 2) = 192: exactly enough
        (382, 900, (32, 32), 1),  # 191: one short
        (4000, 3000, (32, 32), 8),  # 500 x 375
        (4000, 3000, (224, 224), 2),  # 2000 x 1500; 1/4 would leave 750 < 1344
        (1920, 1080, (224, 224), 1),
        (1920, 1080, (32, 32), 4),  # 480 x 270; 1/8 would leave 135 < 192
        (1024, 1024, (32, 32), 4),  # the photo-sized test set: 256 x 256
        (3072, 3072, (32, 64), 8),  # the model's longer side counts: 384 >= 6 * 64
        (3072, 3072, (32, 65), 4),
    ],
)
def test_the_scale_keeps_the_shorter_side_at_six_times_the_models_longer_side(width, height, size, scale):
    assert DCT_SCALE_MARGIN == 6
    assert dct_scale(width, height, size) == scale
    assert dct_scale(height, width, size) == scale  # EXIF rotation cannot change it
    if scale > 1:
        assert min(math.ceil(width / scale), math.ceil(height / scale)) >= 6 * max(size)
    if scale < 8:
        assert min(math.ceil(width / (2 * scale)), math.ceil(height / (2 * scale))) < 6 * max(size)


# ---- both decoders give the same pixels at each scale ----------------------------------------------------------

JPEG_VARIANTS = [
    ("RGB", {"quality": 90}),  # 4:2:0
    ("RGB", {"quality": 90, "subsampling": 0}),  # 4:4:4
    ("RGB", {"subsampling": 1}),  # 4:2:2
    ("RGB", {"progressive": True}),
    ("L", {}),
]
# (width, height) that the model input (8, 8) decodes at 1/8, 1/4, 1/2, 1/1: odd sizes test the rounding up.
SCALED_SIZES = {8: (603, 453), 4: (303, 237), 2: (153, 111), 1: (93, 51)}


@pytest.mark.parametrize(("mode", "save_args"), JPEG_VARIANTS)
@pytest.mark.parametrize("scale", [8, 4, 2, 1])
def test_both_jpeg_decoders_give_identical_pixels_at_each_scale(mode, save_args, scale):
    width, height = SCALED_SIZES[scale]
    image = photo(width, height, mode)
    plain = encode(image, "JPEG", **save_args)
    with_exif = encode(image, "JPEG", exif=exif_block(1), **save_args)  # the same JPEG that Pillow must read
    assert dct_scale(width, height, (8, 8)) == scale
    assert plain_jpeg_size(plain) == (width, height) and plain_jpeg_size(with_exif) is None

    # simplejpeg chooses exactly 1/scale, and so does Pillow's draft; they decode it to the same pixels.
    expected_size = (math.ceil(width / scale), math.ceil(height / scale))
    scaled = {} if scale == 1 else {"min_width": expected_size[0], "min_height": expected_size[1]}
    fast = simplejpeg.decode_jpeg(plain, colorspace="GRAY" if mode == "L" else "RGB", strict=True, **scaled)
    drafted = Image.open(io.BytesIO(with_exif))
    if scale > 1:
        drafted.draft("RGB", (width // scale, height // scale))
        assert drafted.decoderconfig == (scale, 0)  # 1/scale, and not Pillow's fast draft DCT
    assert drafted.size == expected_size and fast.shape[:2] == expected_size[::-1]
    assert np.array_equal(fast.squeeze(-1) if mode == "L" else fast, np.asarray(drafted))

    # decode_image is that decode then the usual resize, by either path.
    via_simplejpeg = decode_image(plain, (8, 8))
    expected = resize_to(Image.fromarray(fast.squeeze(-1) if mode == "L" else fast).convert("RGB"), (8, 8))
    assert np.array_equal(via_simplejpeg, expected)
    assert np.array_equal(decode_image(with_exif, (8, 8)), via_simplejpeg)
    assert np.array_equal(pillow_pixels(Image.open(io.BytesIO(plain)), (8, 8)), via_simplejpeg)


@pytest.mark.parametrize("data", [encode(photo(33, 17), "JPEG"), encode(photo(64, 64), "JPEG", exif=exif_block())])
def test_small_images_decode_exactly_as_a_full_decode(data):
    assert np.array_equal(decode_image(data, (32, 32)), decode_image(data, (32, 32), dct_scaling=False))


def test_a_large_jpeg_is_scaled_and_the_full_decode_stays_available():
    data = encode(photo(1600, 1200), "JPEG", quality=90)
    new, old = decode_image(data, (32, 32)), decode_image(data, (32, 32), dct_scaling=False)
    full = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    assert np.array_equal(old, resize_to(Image.fromarray(full), (32, 32)))
    assert not np.array_equal(new, old)  # 1/8 scale: a different (block-averaged) route to the same picture
    assert np.abs(new.astype(int) - old).mean() < 3


def test_an_exif_rotated_large_jpeg_is_scaled_then_turned_upright():
    image = Image.new("RGB", (800, 400), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 400, 400))
    out = decode_image(encode(image, "JPEG", exif=exif_block(6), quality=95), (20, 10))  # shown 400 wide, 800 tall
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 50  # red on top
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 50


# ---- formats phones write --------------------------------------------------------------------------------------


def mpo(frames: list[Image.Image], **save_args) -> bytes:
    return encode(frames[0], "MPO", save_all=True, append_images=frames[1:], **save_args)


@pytest.mark.parametrize("size", [(300, 400), (16, 12)])  # decoded at 1/8, and at full size
def test_mpo_decodes_its_first_frame_as_the_jpeg_it_is(size):
    width, height = size
    first, second = photo(width, height, seed=1), photo(width, height, seed=2)
    data = mpo([first, second], quality=90)
    assert open_image(data).image.format == "MPO"
    expected = decode_image(encode(first, "JPEG", quality=90), (8, 8))
    assert np.array_equal(decode_image(data, (8, 8)), expected)
    assert not np.array_equal(decode_image(encode(second, "JPEG", quality=90), (8, 8)), expected)


def two_colours(size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


@pytest.mark.parametrize("fmt", [pytest.param("HEIF", marks=needs_heif), pytest.param("AVIF", marks=needs_avif)])
def test_heic_and_avif_decode(fmt):
    data = encode(two_colours(), fmt, quality=90)
    assert open_image(data).image.format == fmt
    out = decode_image(data, (48, 64))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert out[24, 8, 0] > 200 and out[24, 8, 2] < 60  # left half red
    assert out[24, 56, 2] > 200 and out[24, 56, 0] < 60  # right half blue


@needs_avif
def test_avif_orientation_is_applied():
    data = encode(two_colours((20, 10)), "AVIF", quality=95, exif=exif_block(6))
    out = decode_image(data, (20, 10))  # shown 10 wide, 20 tall, red on top
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 60
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 60


def hide_opener(monkeypatch, fmt: str) -> None:
    """Pillow as if the plugin that opens `fmt` were not installed."""
    monkeypatch.delitem(Image.OPEN, fmt)
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name != fmt])


@needs_heif
def test_heic_without_the_plugin_is_refused_with_the_line_that_installs_it(monkeypatch):
    data = encode(two_colours(), "HEIF")
    hide_opener(monkeypatch, "HEIF")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, (8, 8))
    assert err.value.reason == "unsupported_format"
    assert PHOTOS_EXTRA in str(err.value) and PHOTOS_EXTRA == "pip install 'visionserve[photos]'"


@needs_avif
def test_avif_without_a_decoder_is_refused_with_the_reason(monkeypatch):
    data = encode(two_colours(), "AVIF")
    hide_opener(monkeypatch, "AVIF")
    monkeypatch.setattr(imaging.features, "check", lambda name: name != "avif")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, (8, 8))
    assert err.value.reason == "unsupported_format" and "AVIF" in str(err.value)


# ---- transparency: white background ----------------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_file(width: int, height: int, depth: int, colour_type: int, rows: list[bytes], extra: bytes = b"") -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit colour, 16-bit alpha or colour keys."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\0" + row for row in rows))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


RED_BLUE_PALETTE = png_chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 255]))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # 16-bit RGBA: transparent red, then opaque dark red (0x8080 -> 128)
        (png_file(2, 1, 16, 6, [struct.pack(">8H", 65535, 0, 0, 0, 0x8080, 0, 0, 65535)]), [[255] * 3, [128, 0, 0]]),
        # 16-bit gray + alpha: transparent black, then opaque 0x4040
        (png_file(2, 1, 16, 4, [struct.pack(">4H", 0, 0, 0x4040, 65535)]), [[255] * 3, [64] * 3]),
        # 16-bit gray with a colour key (tRNS): the key's pixels are transparent
        (
            png_file(2, 1, 16, 0, [struct.pack(">2H", 1000, 0x8080)], png_chunk(b"tRNS", struct.pack(">H", 1000))),
            [[255] * 3, [128] * 3],
        ),
        # 8-bit RGB and gray with colour keys
        (
            png_file(2, 1, 8, 2, [bytes([10, 20, 30, 200, 0, 0])], png_chunk(b"tRNS", struct.pack(">3H", 10, 20, 30))),
            [[255] * 3, [200, 0, 0]],
        ),
        (png_file(2, 1, 8, 0, [bytes([10, 200])], png_chunk(b"tRNS", struct.pack(">H", 10))), [[255] * 3, [200] * 3]),
        # palette with per-entry alpha: entry 0 transparent red, entry 1 half-transparent blue over white
        (
            png_file(2, 1, 8, 3, [bytes([0, 1])], RED_BLUE_PALETTE + png_chunk(b"tRNS", b"\0\x80")),
            [[255] * 3, [127, 127, 255]],
        ),
    ],
    ids=["rgba16", "la16", "gray16-key", "rgb8-key", "gray8-key", "palette-alpha"],
)
def test_transparent_pngs_are_composited_onto_white(data, expected):
    assert decode_image(data, (1, 2)).tolist() == [expected]


# ---- ICC profiles: Display P3 -> sRGB --------------------------------------------------------------------------

D50 = (0.9642, 1.0, 0.8249)  # the ICC profile connection space's white
D65 = (0.3127, 0.3290)
P3_PRIMARIES = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
SRGB_PRIMARIES = ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060))
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def xyz(chromaticity) -> np.ndarray:
    x, y = chromaticity
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_to_xyz(primaries) -> np.ndarray:
    """Linear RGB -> CIE XYZ for these primaries and a D65 white."""
    columns = np.stack([xyz(p) for p in primaries], axis=1)
    return columns * np.linalg.solve(columns, xyz(D65))


def srgb_decode(v):
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def srgb_encode(v):
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * np.power(np.maximum(v, 0), 1 / 2.4) - 0.055)


def rgb_icc_profile(primaries, description: str) -> bytes:
    """A matrix/TRC ICC v2 display profile: these primaries, a D65 white, the sRGB tone curve. (No Display P3
    profile ships offline, and LittleCMS builds only sRGB, Lab and XYZ ones.)"""
    d65_to_d50 = np.linalg.inv(BRADFORD) @ np.diag((BRADFORD @ D50) / (BRADFORD @ xyz(D65))) @ BRADFORD
    colorants = d65_to_d50 @ rgb_to_xyz(primaries)  # the profile's r/g/b XYZ tags are adapted to D50

    def xyz_tag(values) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    curve = np.round(srgb_decode(np.linspace(0, 1, 1024)) * 65535).astype(">u2").tobytes()
    trc = b"curv\0\0\0\0" + struct.pack(">I", 1024) + curve
    text = description.encode("ascii") + b"\0"
    tags = [
        (b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 3 + 67)),
        (b"wtpt", xyz_tag(D50)),
        (b"rXYZ", xyz_tag(colorants[:, 0])),
        (b"gXYZ", xyz_tag(colorants[:, 1])),
        (b"bXYZ", xyz_tag(colorants[:, 2])),
        (b"rTRC", trc),
        (b"gTRC", trc),
        (b"bTRC", trc),
        (b"cprt", b"text\0\0\0\0test data\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = struct.pack(
        ">I4sI4s4s4s12s4s", offset + len(body), b"", 0x02100000, b"mntr", b"RGB ", b"XYZ ", b"", b"acsp"
    )
    header += bytes(28) + b"".join(struct.pack(">i", round(v * 65536)) for v in D50) + bytes(48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


P3_PROFILE = rgb_icc_profile(P3_PRIMARIES, "Display P3 (test)")
SRGB_PROFILE = rgb_icc_profile(SRGB_PRIMARIES, "sRGB (test)")


def p3_to_srgb(rgb) -> list[int]:
    """The colorimetric answer: linearise, P3 -> XYZ -> sRGB, clip, encode."""
    linear = srgb_decode(np.asarray(rgb, dtype=float) / 255)
    matrix = np.linalg.solve(rgb_to_xyz(SRGB_PRIMARIES), rgb_to_xyz(P3_PRIMARIES))
    return np.round(srgb_encode(np.clip(matrix @ linear, 0, 1)) * 255).astype(int).tolist()


ICC_SAVE_ARGS = {
    "JPEG": {"quality": 100, "subsampling": 0},
    "PNG": {},
    "WEBP": {"lossless": True},
    "HEIF": {},
    "AVIF": {},
}


@pytest.mark.parametrize(
    "fmt", ["JPEG", "PNG", "WEBP", pytest.param("HEIF", marks=needs_heif), pytest.param("AVIF", marks=needs_avif)]
)
@pytest.mark.parametrize("p3", [(220, 60, 40), (60, 180, 90), (200, 80, 60)])  # a P3 red, green, orange
def test_display_p3_colours_are_converted_to_srgb(fmt, p3):
    save_args = ICC_SAVE_ARGS[fmt]
    data = encode(Image.new("RGB", (16, 16), p3), fmt, icc_profile=P3_PROFILE, **save_args)
    if fmt == "JPEG":
        assert plain_jpeg_size(data) is None  # the profile sends it to Pillow, which reads it
    got = decode_image(data, (8, 8))[4, 4].tolist()
    stored = decode_image(encode(Image.new("RGB", (16, 16), p3), fmt, **save_args), (8, 8))[4, 4]  # JPEG rounds
    expected = p3_to_srgb(stored)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1, (got, expected)
    assert max(abs(a - b) for a, b in zip(got, p3, strict=True)) >= 10  # the conversion did something


def test_a_p3_red_becomes_the_expected_srgb_red():
    data = encode(Image.new("RGB", (8, 8), (220, 60, 40)), "PNG", icc_profile=P3_PROFILE)
    assert p3_to_srgb((220, 60, 40)) == [239, 35, 17]
    assert decode_image(data, (4, 4))[0, 0].tolist() == [239, 35, 17]


def test_srgb_profiles_and_unreadable_ones_leave_the_pixels_alone():
    pixels = np.asarray(photo(64, 48))
    untagged = decode_image(encode(Image.fromarray(pixels), "PNG"), (48, 64))
    assert np.array_equal(untagged, pixels)
    for profile in (SRGB_PROFILE, b"\0" * 16 + b"RGB " + b"garbage" * 20, bytes(200)):
        tagged = encode(Image.fromarray(pixels), "PNG", icc_profile=profile)
        assert np.array_equal(decode_image(tagged, (48, 64)), pixels)


def test_a_large_p3_jpeg_is_scaled_and_converted():
    data = encode(Image.new("RGB", (1200, 900), (220, 60, 40)), "JPEG", quality=100, icc_profile=P3_PROFILE)
    got = decode_image(data, (32, 32))[16, 16].tolist()
    assert max(abs(a - b) for a, b in zip(got, [239, 35, 17], strict=True)) <= 2


# ---- damaged files and header bombs, every accepted format -----------------------------------------------------


def sample(fmt: str) -> bytes:
    image = photo(96, 64)
    if fmt == "MPO":
        return mpo([image, photo(96, 64, seed=3)], quality=90)
    save_args = {"JPEG": {"quality": 90}, "WEBP": {"quality": 80}, "HEIF": {"quality": 80}, "AVIF": {"quality": 80}}
    return encode(image, fmt, **save_args.get(fmt, {}))


FORMATS = [
    "JPEG",
    "MPO",
    "PNG",
    "WEBP",
    pytest.param("HEIF", marks=needs_heif),
    pytest.param("AVIF", marks=needs_avif),
]


def damaged(data: bytes, how: str) -> bytes:
    if how.startswith("cut-"):
        return data[: max(1, len(data) * int(how[4:]) // 100)]
    out = bytearray(data)
    at = {"zeroed-header": 12, "zeroed-middle": len(data) // 2, "flipped-middle": len(data) // 2}[how]
    if how.startswith("zeroed"):
        out[at : at + 24] = bytes(24)
    else:
        out[at : at + 24] = bytes(b ^ 0xFF for b in out[at : at + 24])
    return bytes(out)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["cut-5", "cut-50", "cut-90", "zeroed-header", "zeroed-middle", "flipped-middle"])
def test_damaged_files_are_refused_with_a_decode_reason_or_decoded(fmt, how):
    data = damaged(sample(fmt), how)
    try:
        out = decode_image(data, (16, 16))
    except ImageDecodeError as exc:
        assert exc.reason in DECODE_REASONS, (exc.reason, str(exc))
    else:  # some damage is only visible in the pixels: decoders conceal it
        assert how != "cut-50" and out.shape == (16, 16, 3) and out.dtype == np.uint8


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The first frame header (SOF0) rewritten to declare width x height."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def with_ispe(data: bytes, width: int, height: int) -> bytes:
    """Every `ispe` box of a HEIF/AVIF file rewritten to declare width x height."""
    out, at = bytearray(data), data.find(b"ispe")
    while at >= 0:
        out[at + 8 : at + 16] = struct.pack(">II", width, height)
        at = data.find(b"ispe", at + 4)
    return bytes(out)


def with_vp8_size(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"\x9d\x01\x2a")  # a lossy WebP's key frame start code, then 14-bit width and height
    return data[: at + 3] + struct.pack("<HH", width, height) + data[at + 7 :]


def png_bomb(width: int, height: int) -> bytes:
    return png_file(width, height, 8, 2, [b"\0\0\0"])


@pytest.mark.parametrize(
    ("fmt", "declared"),
    [
        ("JPEG", (8000, 8000)),  # over max_pixels (40 M): the plain JPEG's header, read by simplejpeg
        ("JPEG+EXIF", (8000, 8000)),  # the same through Pillow's header
        ("MPO", (8000, 8000)),
        ("PNG", (8000, 8000)),
        ("PNG", (100_000, 100_000)),  # over Pillow's own limit too
        ("WEBP", (8000, 8000)),
        ("WEBP", (16383, 16383)),  # the largest VP8 frame: over Pillow's limit
        pytest.param("HEIF", (8000, 8000), marks=needs_heif),
        pytest.param("HEIF", (60000, 60000), marks=needs_heif),
        pytest.param("AVIF", (8000, 8000), marks=needs_avif),
        pytest.param("AVIF", (60000, 60000), marks=needs_avif),  # over libavif's limit: its open fails
    ],
)
def test_header_bombs_are_refused_before_decoding(fmt, declared):
    width, height = declared
    if fmt == "JPEG":
        data = with_jpeg_size(sample("JPEG"), width, height)
    elif fmt == "JPEG+EXIF":
        data = with_jpeg_size(encode(photo(96, 64), "JPEG", exif=exif_block()), width, height)
    elif fmt == "MPO":
        data = with_jpeg_size(sample("MPO"), width, height)
    elif fmt == "PNG":
        data = png_bomb(width, height)
    elif fmt == "WEBP":
        data = with_vp8_size(sample("WEBP"), width, height)
    else:
        data = with_ispe(sample(fmt), width, height)
    with pytest.raises(ImageDecodeError) as err:
        open_image(data)  # the header alone
    assert err.value.reason == "image_too_large", str(err.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged EXIF and MPO blocks: expected here
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_damage_never_escapes_as_another_exception(fmt):
    """Seeded fuzzing: cuts, flipped and zeroed runs anywhere. The service turns ImageDecodeError into 400/413/415;
    anything else would be a 500."""
    rng = np.random.default_rng(0)
    base = sample(fmt)
    for _ in range(150):
        data = bytearray(base)
        kind, at, run = rng.integers(3), int(rng.integers(len(data))), int(rng.integers(1, 16))
        if kind == 0:
            data = data[: max(at, 1)]
        else:
            for i in range(at, min(at + run, len(data))):
                data[i] = 0 if kind == 1 else data[i] ^ int(rng.integers(1, 256))
        try:
            decode_image(bytes(data), (16, 16))
        except ImageDecodeError as exc:
            assert exc.reason in DECODE_REASONS


# ---- through the service's app: JSON errors with the decoder's reasons, never a 500 -----------------------------


@pytest.fixture(scope="module")
def service_client(tmp_path_factory):
    """The service's app in this process over the colour package."""
    from tests.support.color_package import make_color_package
    from tests.support.in_process import in_process_service

    with in_process_service(make_color_package(tmp_path_factory.mktemp("photos") / "color")) as client:
        yield client


def classify(client, data: bytes):
    return client.post("/classify?top_k=1", files={"image": ("photo", data)})


def test_the_service_takes_phone_formats(service_client):
    red = Image.new("RGB", (400, 300), (255, 0, 0))
    for data in (mpo([red, red]), encode(red, "JPEG", icc_profile=P3_PROFILE, exif=exif_block())):
        response = classify(service_client, data)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == "red"


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        pytest.param("HEIF", "image/heic", marks=needs_heif),
        pytest.param("HEIF", "image/heif", marks=needs_heif),
        pytest.param("AVIF", "image/avif", marks=needs_avif),
        ("MPO", "image/jpeg"),
        ("JPEG", "application/octet-stream"),
    ],
)
def test_a_photo_sent_as_a_raw_body_of_its_own_media_type_is_classified(service_client, fmt, media_type):
    # Before, only image/jpeg, image/png and image/webp bodies were taken: an app uploading HEIC got 415.
    data = sample(fmt)
    response = service_client.post("/classify?top_k=1", content=data, headers={"content-type": media_type})
    assert response.status_code == 200, response.text
    assert response.json() == classify(service_client, data).json()


@needs_heif
def test_the_service_answers_heic_problems_with_json_errors(service_client, monkeypatch):
    heic = sample("HEIF")
    assert classify(service_client, heic).status_code == 200
    for data, status, code in [
        (heic[: len(heic) // 2], 400, "corrupt"),
        (with_ispe(heic, 8000, 8000), 413, "image_too_large"),
    ]:
        response = classify(service_client, data)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text
    hide_opener(monkeypatch, "HEIF")
    response = classify(service_client, heic)
    assert (response.status_code, response.json()["code"]) == (415, "unsupported_format")
    assert PHOTOS_EXTRA in response.json()["error"]


def test_only_the_jpeg_header_is_searched_for_exif_icc_and_mpf_blocks():
    data = encode(photo(64, 48), "JPEG")
    trailing = data + imaging.EXIF_ID + imaging.ICC_ID  # the signatures after the scan: image data, not blocks
    assert imaging.jpeg_header(data) == data[: data.index(b"\xff\xda")]
    assert plain_jpeg_size(trailing) == (64, 48)
    assert np.array_equal(decode_image(trailing, (16, 16)), decode_image(data, (16, 16)))
    broken = data[:2] + b"\x00" + data[3:]  # no marker after the start: the whole file is searched
    assert imaging.jpeg_header(broken) == broken
