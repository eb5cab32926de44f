"""The one decode/resize function: training's evaluation, export parity, the service and batch scoring all call it.

Policy (documented in the README):
- Accepted formats: JPEG, MPO (phones' multi-picture JPEGs: the first frame, a plain JPEG, is decoded), PNG, WebP,
  AVIF (Pillow's own decoder) and HEIC/HEIF (the optional pi-heif plugin, `pip install 'visionserve[photos]'`;
  without it a HEIC upload is refused as unsupported_format with that line). Anything else is refused before
  decoding.
- The pixel count is checked from the header before decoding; Pillow's decompression-bomb warning is an error.
  A HEIF or AVIF file whose decoder refuses its header is judged by the largest size its `ispe` boxes declare.
- EXIF orientation is applied; HEIF's rotation and mirroring boxes are applied by libheif (which makes the EXIF
  orientation of a HEIF file void) and AVIF's are read by Pillow as an EXIF orientation.
- Colour: every mode becomes 8-bit RGB. Transparency (RGBA, LA, a palette's or a colour key's transparent colour)
  is composited onto white; 16-bit and 32-bit integer images are scaled to 8 bits (not clipped); CMYK and YCbCr
  are converted by Pillow; grayscale is replicated to three channels. An embedded RGB ICC profile (Display P3 from
  phones) is converted to sRGB by LittleCMS (ImageCms, perceptual intent) after the resize below, so
  the cost is the model input's size, not the photo's; profiles of other colour spaces and unreadable ones are
  ignored (the pixels are taken as sRGB, as browsers do).
- Size: the image is scaled so that it covers the model's (H, W) and centre-cropped (aspect ratio kept),
  with bilinear filtering (antialiased when shrinking). An image already of size (H, W) is untouched.
- Large JPEGs (and MPO) are decoded at a reduced DCT scale first: 1/d with d the largest of 1, 2, 4, 8 such that
  min(ceil(w / d), ceil(h / d)) >= 6 * max(H, W), for a w x h image and the model's (H, W): the shorter side keeps
  at least six times the model's longer side (whatever the EXIF orientation). The scaled IDCT rebuilds each 8x8 block
  from its lowest frequencies, a low-pass filter at no cost, and skips most of the decoder's and the resize's work;
  small images (CIFAR's 32x32) have d = 1 and decode exactly as before. `dct_scaling=False` decodes at full size
  (benchmarks, tests).

Decoding: the common JPEG (YCbCr or grayscale, no EXIF block, so no rotation, no ICC profile and no MPF block,
which Pillow reads as MPO) is read and decoded by simplejpeg, which calls the same libjpeg-turbo with the same
settings as Pillow without Pillow's Python-level work: the same pixels (tested at every DCT scale; equal on all
10,000 CIFAR-10 test JPEGs) in a fraction of the time, which matters where decoding is most of the work (the
service's event loop, batch scoring of small images). Pillow reads and decodes everything else, and any JPEG that
libjpeg-turbo warns about.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

# The optional `photos` extra: pi-heif, libheif's decoder-only build (LGPL); pillow-heif, which also bundles the
# GPL x265 encoder, where a user has that instead. Without either, HEIC/HEIF is refused with the line that installs it.
try:
    import pi_heif as heif_plugin
except ImportError:
    try:
        import pillow_heif as heif_plugin
    except ImportError:
        heif_plugin = None
if heif_plugin is not None:
    heif_plugin.register_heif_opener()

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "AVIF", "HEIF"})
DCT_SCALED_FORMATS = frozenset({"JPEG", "MPO"})
DCT_SCALES = (8, 4, 2)  # libjpeg-turbo's 1/d scales that keep whole 8x8 blocks, largest reduction first
# The scaled image keeps this many times the model's side: the smallest multiple at which predictions on photo-sized
# test images stayed within 0.2 points of a full decode (2 and 4 lost more: benchmarks/results/photos.md).
DCT_SCALE_MARGIN = 6
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB of RGB
JPEG_START = b"\xff\xd8\xff"  # start-of-image marker, then the first segment's marker
EXIF_ID = b"Exif\x00\x00"  # opens an EXIF block (APP1): the orientation lives there
MPF_ID = b"MPF\x00"  # opens a multi-picture block (APP2): Pillow reads such files as MPO
ICC_ID = b"ICC_PROFILE\x00"  # opens an ICC profile chunk (APP2): Pillow reads and converts it
PLAIN_JPEG_COLORSPACES = ("YCbCr", "Gray")  # simplejpeg's names; CMYK, YCCK and RGB JPEGs go to Pillow
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
PHOTOS_EXTRA = "pip install 'visionserve[photos]'"
SRGB = ImageCms.createProfile("sRGB")


class OpenedImage(NamedTuple):
    """An image whose header passed the checks (open_image), not decoded yet."""

    data: bytes
    width: int
    height: int
    image: Image.Image | None  # Pillow's, or None for a plain JPEG that simplejpeg decodes

    @property
    def pixel_count(self) -> int:
        return self.width * self.height


class ImageDecodeError(ValueError):
    """An input that cannot become model pixels. `reason` is one of: empty, unsupported_format, corrupt, image_too_large (the service's codes too)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(
    data: bytes,
    size: tuple[int, int],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dct_scaling: bool = True,
) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB array of the model's `size` = (H, W).

    dct_scaling=False decodes a large JPEG at full size before the resize (the old way: benchmarks, tests)."""
    return to_pixels(open_image(data, max_pixels=max_pixels), size, dct_scaling=dct_scaling)


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> OpenedImage:
    """Read and check the header only (format, pixel count); nothing is decoded yet. Finish with to_pixels."""
    if not data:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")
    size = plain_jpeg_size(data)
    if size is None:
        image = pillow_open(data, max_pixels=max_pixels)
        size = image.size
    else:
        image = None
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "image_too_large", f"the image has {width}x{height} pixels, more than the limit of {max_pixels}"
        )
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:  # what Pillow's open refuses
        raise ImageDecodeError("image_too_large", "the image header declares too many pixels")
    return OpenedImage(data, width, height, image)


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg decodes to exactly Pillow's pixels: YCbCr or grayscale, no EXIF
    block (so no rotation to apply), no ICC profile (so no colour conversion) and no MPF block, and a header
    libjpeg-turbo reads without a warning. None for anything else, which Pillow opens."""
    if not data.startswith(JPEG_START):
        return None
    header = jpeg_header(data)
    if EXIF_ID in header or MPF_ID in header or ICC_ID in header:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data, strict=True)
    except ValueError:
        return None
    return (width, height) if colorspace in PLAIN_JPEG_COLORSPACES else None


def jpeg_header(data: bytes) -> bytes:
    """A JPEG's segments before its first scan (SOS), where the EXIF, ICC and MPF blocks are: searched instead of
    the megabytes of image data after them, in which their signatures can also occur by chance. The whole file
    when the markers do not lead to a scan (a damaged file)."""
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
        elif marker == 0xDA:
            return data[:at]
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return data


def dct_scale(width: int, height: int, size: tuple[int, int]) -> int:
    """The d of the 1/d DCT scale that a width x height JPEG is decoded at for a model of `size` = (H, W): the
    largest of 8, 4, 2 whose scaled shorter side keeps at least DCT_SCALE_MARGIN times the model's longer side,
    else 1."""
    needed = DCT_SCALE_MARGIN * max(size)
    for scale in DCT_SCALES:
        if min(-(-width // scale), -(-height // scale)) >= needed:
            return scale
    return 1


def pillow_open(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Pillow's reading of the header, its errors as ImageDecodeError, and the format checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=None)
        except UnidentifiedImageError:
            raise unidentified(data, max_pixels) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("image_too_large", "the image header declares too many pixels") from None
        except (OSError, SyntaxError, ValueError, RuntimeError) as exc:  # a recognised header cut short or malformed
            raise ImageDecodeError("corrupt", f"the image header is truncated or corrupt: {exc}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ImageDecodeError(
            "unsupported_format",
            f"image format {image.format} is not accepted; send one of {sorted(ACCEPTED_FORMATS)}",
        )
    return image


def unidentified(data: bytes, max_pixels: int) -> ImageDecodeError:
    """The error for bytes that no Pillow opener took: HEIF and AVIF files (whose decoders refuse damaged headers
    and sizes over their own limits) are told apart from unknown formats by their `ftyp` brands."""
    brands = isobmff_brands(data)
    if brands & AVIF_BRANDS:
        kind, missing = "AVIF", not features.check("avif")
        install = "this Pillow build has no AVIF codec; install a Pillow built with libavif (as its wheels are)"
    elif brands & HEIF_BRANDS:
        kind, missing = "HEIC/HEIF", "HEIF" not in Image.OPEN
        install = f"HEIC/HEIF images need the optional pi-heif plugin, which is not installed: {PHOTOS_EXTRA}"
    else:
        return ImageDecodeError("unsupported_format", "the bytes are not an image in a known format")
    if missing:
        return ImageDecodeError("unsupported_format", install)
    declared = isobmff_declared_pixels(data)
    if declared > max_pixels:
        return ImageDecodeError("image_too_large", f"the {kind} header declares {declared} pixels")
    return ImageDecodeError("corrupt", f"the {kind} image's header is truncated or corrupt")


def isobmff_brands(data: bytes) -> frozenset[bytes]:
    """The major and compatible brands of an ISO base media file's leading `ftyp` box (HEIF, AVIF); empty for
    anything else."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return frozenset()
    end = min(int.from_bytes(data[:4], "big"), len(data))
    return frozenset([data[8:12], *(data[at : at + 4] for at in range(16, end - 3, 4))])


def isobmff_declared_pixels(data: bytes) -> int:
    """The largest width x height that the file's `ispe` (image spatial extents) boxes declare, 0 if none."""
    largest, at = 0, data.find(b"ispe")
    while 0 <= at <= len(data) - 16:  # the box type, then version and flags, then width and height
        width, height = struct.unpack_from(">II", data, at + 8)
        largest = max(largest, width * height)
        at = data.find(b"ispe", at + 4)
    return largest


def to_pixels(opened: OpenedImage, size: tuple[int, int], *, dct_scaling: bool = True) -> np.ndarray:
    """An image from open_image -> (H, W, 3) uint8: decoded, EXIF-oriented, converted to RGB, resized."""
    if opened.image is not None:
        return pillow_pixels(opened.image, size, dct_scaling=dct_scaling)
    scale = dct_scale(opened.width, opened.height, size) if dct_scaling else 1
    # simplejpeg picks the smallest scale whose result is at least min_width x min_height: exactly 1/scale here.
    # At scale 1 none is given: for a tiny image a 7/8 scale could reach the same size with another IDCT.
    scaled = {"min_width": -(-opened.width // scale), "min_height": -(-opened.height // scale)} if scale > 1 else {}
    try:
        # strict: libjpeg-turbo's warnings (corrupt or truncated data) raise instead of decoding on.
        pixels = simplejpeg.decode_jpeg(opened.data, colorspace="RGB", strict=True, **scaled)
    except ValueError:  # damaged data: Pillow decides, as for any other image (it decodes some, refuses others)
        image = pillow_open(opened.data)
        if image.size != (opened.width, opened.height):  # a crafted file read two ways: trust neither
            raise ImageDecodeError("corrupt", "the JPEG's headers disagree on its size") from None
        return pillow_pixels(image, size, dct_scaling=dct_scaling)
    height, width = size
    return pixels if pixels.shape[:2] == (height, width) else resize_to(Image.fromarray(pixels), size)


def pillow_pixels(image: Image.Image, size: tuple[int, int], *, dct_scaling: bool = True) -> np.ndarray:
    """to_pixels by Pillow alone: an image from pillow_open, decoded, EXIF-oriented, converted to RGB, resized."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            scale = dct_scale(image.width, image.height, size) if dct_scaling else 1
            if scale > 1 and image.format in DCT_SCALED_FORMATS:
                # Pillow picks the largest 1/d whose result is at least the size asked; w // d asks for exactly 1/d.
                image.draft("RGB", (image.width // scale, image.height // scale))
            image.load()
            profile = image.info.get("icc_profile")
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("image_too_large", "the image decodes to too many pixels") from None
        except (OSError, SyntaxError, ValueError, RuntimeError) as exc:  # Pillow's (and AVIF's) ways of saying damaged
            raise ImageDecodeError("corrupt", f"the image is truncated or corrupt: {exc}") from None
    pixels = resize_to(rgb, size)
    transform = srgb_transform(profile) if profile else None
    if transform is None:
        return pixels
    return np.asarray(ImageCms.applyTransform(Image.fromarray(pixels), transform), dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def srgb_transform(profile: bytes) -> ImageCms.ImageCmsTransform | None:
    """The RGB -> sRGB transform of an embedded ICC profile, or None for a profile of another colour space or one
    LittleCMS cannot read. Cached: building one costs more than applying it to a model-sized image."""
    if profile[16:20] != b"RGB ":  # the header's data colour space
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        # NOCACHE: no one-pixel cache inside the transform, so threads can share it.
        return ImageCms.buildTransform(source, SRGB, "RGB", "RGB", flags=ImageCms.Flags.NOCACHE)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def resize_to(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB image -> (H, W, 3) uint8, scaled to cover (H, W) and centre-cropped."""
    height, width = size
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's convert() clips 16/32-bit values at 255; scale to the full 8-bit range instead.
        pixels = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        peak = 0xFFFF if image.mode != "I" else max(int(pixels.max()), 1)
        gray = Image.fromarray((pixels.astype(np.float64) * (255.0 / peak)).round().astype(np.uint8), "L")
        key = image.info.get("transparency")
        if isinstance(key, int):  # a colour key is a 16-bit value: compare before scaling
            image = Image.merge("LA", (gray, Image.fromarray(np.where(pixels == key, 0, 255).astype(np.uint8))))
        else:
            image = gray
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; lossless, so decode_image gives the same pixels back (tests, fixtures)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
