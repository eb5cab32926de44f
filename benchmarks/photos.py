"""Camera photos through decode_image: CPU time per photo and accuracy, old (full decode) vs new (DCT-scaled).

    python -m benchmarks.photos --package PACKAGE [--count 1000] [--count-12mp 300] [--rounds 7]

(a) Time. Generated photos, each decoded to 32x32 and to 224x224 by `inference.imaging.decode_image` the old way
(`dct_scaling=False`: a full decode, then the resize) and the new way (a JPEG decoded at the 1/d DCT scale of the
policy, then the same resize), taking turns round by round; figures are this process's CPU time per decode (all
its threads: libheif decodes with several), the median over the rounds, on one process. The photos: a 12 MP JPEG
(4000x3000, quality 90; a CIFAR-10 test image upscaled with luminance noise, so that it weighs what a camera's
photo does), the same JPEG with an EXIF block (phones' photos have one: Pillow's path), a 1080p JPEG made the same
way, the 12 MP photo as HEIC (pillow-heif, when installed) and a 2560x1600 PNG screenshot (flat colours and text).
For the JPEGs the 1/d decode alone (simplejpeg, no resize) is timed too: the entropy decoding it cannot skip is the
floor of the new way.

(b) Accuracy. CIFAR-10 test images (a seeded subset of the archive's test/<class>/ members) upscaled bicubic to
1024x1024 (`--count`) and to 4000x3000 (`--count-12mp`: upscaled to 3000x3000 and mirrored out at the sides, so
that the centre crop sees the whole image undistorted), saved as JPEG quality 90 and cached under .cache/photos,
are classified by `--package` (ONNX Runtime on the CPU) after the old and the new decode: top-1 accuracy of each,
the change in points (the target: within 0.2) and the top-1 agreement. The 32x32 originals' accuracy is the
reference.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw, ImageFont

from benchmarks.common import DEFAULT_ARCHIVE, RESULTS, describe_package, labelled_test_jpegs, machine, run_and_report
from benchmarks.servers import REPO
from inference import imaging
from inference.files import atomic_write
from inference.imaging import dct_scale, decode_image
from inference.package import load_package
from inference.runtime import Predictor

CACHE = REPO / ".cache" / "photos"
SIZES = ((32, 32), (224, 224))  # the lesson CNN's input and ResNet-18's
JPEG_QUALITY = 90
HEIC_QUALITY = 60
ACCURACY_TARGET_POINTS = 0.2


# ---- photos ----------------------------------------------------------------------------------------------------


def cached(path: Path, make: Callable[[], bytes]) -> bytes:
    if not path.is_file():
        with atomic_write(path) as f:
            f.write(make())
    return path.read_bytes()


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    if fmt == "HEIF":  # pillow-heif encodes (the dev extra); the decoder the service uses may be pi-heif
        import pillow_heif

        pillow_heif.from_pillow(image).save(buffer, **save_args)
    else:
        image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def camera_like(small: bytes, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A small image upscaled bicubic to `size` (W, H) with luminance noise: the fine detail that makes a camera's
    JPEG as heavy as it is, and its decoding as slow."""
    base = np.asarray(Image.open(io.BytesIO(small)).convert("RGB").resize(size, Image.Resampling.BICUBIC))
    noise = np.random.default_rng(seed).normal(0.0, 8.0, base.shape[:2])[..., None]
    return (base + noise).clip(0, 255).astype(np.uint8)


def screenshot(size: tuple[int, int] = (2560, 1600), seed: int = 0) -> Image.Image:
    """Flat panels and lines of text-like words: what a PNG screenshot holds."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (246, 246, 248))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=15)
    for _ in range(40):  # windows, bars and buttons
        x, y = int(rng.integers(0, size[0] - 200)), int(rng.integers(0, size[1] - 100))
        width, height = int(rng.integers(100, 900)), int(rng.integers(30, 600))
        draw.rectangle((x, y, x + width, y + height), fill=tuple(int(v) for v in rng.integers(120, 256, 3)))
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz      "))
    for y in range(10, size[1] - 20, 22):
        words = "".join(rng.choice(letters, int(rng.integers(60, 220))))
        draw.text((int(rng.integers(5, 60)), y), words, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
    return image


def timing_photos(archive: Path) -> dict[str, bytes]:
    """The photos of part (a), generated once and cached."""
    (_, _, small), *_ = labelled_test_jpegs(archive, 1, seed=5)
    photos = {}
    twelve = camera_like(small, (4000, 3000))
    photos["12 MP JPEG (4000x3000 q90)"] = cached(
        CACHE / "timing" / "12mp.jpg", lambda: encode(Image.fromarray(twelve), "JPEG", quality=JPEG_QUALITY)
    )
    exif = Image.Exif()
    exif[0x0112] = 1  # upright: the block alone sends the file to Pillow
    photos["12 MP JPEG with EXIF (Pillow's path)"] = cached(
        CACHE / "timing" / "12mp-exif.jpg",
        lambda: encode(Image.fromarray(twelve), "JPEG", quality=JPEG_QUALITY, exif=exif),
    )
    photos["1080p JPEG (1920x1080 q90)"] = cached(
        CACHE / "timing" / "1080p.jpg",
        lambda: encode(Image.fromarray(camera_like(small, (1920, 1080))), "JPEG", quality=JPEG_QUALITY),
    )
    if imaging.heif_plugin is not None:
        photos[f"12 MP HEIC (4000x3000 q{HEIC_QUALITY})"] = cached(
            CACHE / "timing" / f"12mp-q{HEIC_QUALITY}.heic",
            lambda: encode(Image.fromarray(twelve), "HEIF", quality=HEIC_QUALITY),
        )
    photos["PNG screenshot (2560x1600)"] = cached(
        CACHE / "timing" / "screenshot.png", lambda: encode(screenshot(), "PNG")
    )
    return photos


def upscaled(small: bytes, size: tuple[int, int]) -> bytes:
    """A 32x32 test image as a `size` (W, H) JPEG photo: bicubic to the shorter side's square, mirrored out to W."""
    width, height = size
    square = np.asarray(Image.open(io.BytesIO(small)).convert("RGB").resize((height, height), Image.Resampling.BICUBIC))
    left = (width - height) // 2
    wide = np.pad(square, ((0, 0), (left, width - height - left), (0, 0)), mode="reflect")
    return encode(Image.fromarray(wide), "JPEG", quality=JPEG_QUALITY)


def photo_set(images: list[tuple[str, str, bytes]], size: tuple[int, int]) -> list[bytes]:
    folder = CACHE / f"cifar10-test-{size[0]}x{size[1]}-q{JPEG_QUALITY}"
    return [cached(folder / name.replace("/", "_"), lambda s=small: upscaled(s, size)) for name, _, small in images]


# ---- measurements ----------------------------------------------------------------------------------------------


def cpu_ms(function: Callable[[], object]) -> float:
    started = time.process_time()
    function()
    return 1000 * (time.process_time() - started)


def time_photo(data: bytes, size: tuple[int, int], rounds: int) -> dict:
    old_ms, new_ms = [], []
    for _ in range(rounds):  # taking turns, so that the machine's other load falls on both alike
        old_ms.append(cpu_ms(lambda: decode_image(data, size, dct_scaling=False)))
        new_ms.append(cpu_ms(lambda: decode_image(data, size)))
    opened = imaging.open_image(data)
    scale = dct_scale(opened.width, opened.height, size) if data.startswith(imaging.JPEG_START) else 1
    old, new = decode_image(data, size, dct_scaling=False), decode_image(data, size)
    row = {
        "input": f"{size[0]}x{size[1]}",
        "dct_scale": f"1/{scale}",
        "old_ms": round(statistics.median(old_ms), 2),
        "new_ms": round(statistics.median(new_ms), 2),
        "mean_abs_pixel_change": round(float(np.abs(old.astype(int) - new).mean()), 3),
    }
    row["speedup"] = round(row["old_ms"] / row["new_ms"], 2)
    if scale > 1:
        scaled = {"min_width": -(-opened.width // scale), "min_height": -(-opened.height // scale)}
        floor = [cpu_ms(lambda: simplejpeg.decode_jpeg(data, colorspace="RGB", **scaled)) for _ in range(rounds)]
        row["scaled_decode_alone_ms"] = round(statistics.median(floor), 2)
    return row


def accuracy(predictor: Predictor, blobs: list[bytes], labels: np.ndarray, size, **decode_args) -> dict:
    started = time.process_time()
    pixels = np.stack([decode_image(blob, size, **decode_args) for blob in blobs])
    decode_seconds = time.process_time() - started
    top1 = np.concatenate([predictor.predict(pixels[i : i + 500]).argmax(1) for i in range(0, len(pixels), 500)])
    return {"top1": top1, "accuracy": float((top1 == labels).mean()), "decode_ms": 1000 * decode_seconds / len(blobs)}


def run(args: argparse.Namespace) -> dict:
    results: dict = {
        "command": " ".join(["python -m benchmarks.photos", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"rounds": args.rounds, "count": args.count, "count_12mp": args.count_12mp},
        "package": describe_package(args.package),
        "timing": [],
        "accuracy": [],
    }
    for name, data in timing_photos(args.data).items():
        for size in SIZES:
            row = {"photo": name, "megabytes": round(len(data) / 1e6, 2), **time_photo(data, size, args.rounds)}
            results["timing"].append(row)
            print(row, flush=True)

    predictor = Predictor(load_package(args.package), device="cpu")
    size = tuple(predictor.spec.input_size)
    classes = list(predictor.spec.class_names)
    images = labelled_test_jpegs(args.data, max(args.count, args.count_12mp))
    labels = np.array([classes.index(label) for _, label, _ in images])
    originals = accuracy(predictor, [small for _, _, small in images[: args.count]], labels[: args.count], size)
    results["reference_accuracy_32x32"] = {"images": args.count, "accuracy": originals["accuracy"]}
    for photo_size, count in (((1024, 1024), args.count), ((4000, 3000), args.count_12mp)):
        blobs = photo_set(images[:count], photo_size)
        old = accuracy(predictor, blobs, labels[:count], size, dct_scaling=False)
        new = accuracy(predictor, blobs, labels[:count], size)
        change = 100 * (new["accuracy"] - old["accuracy"])
        row = {
            "photos": f"{photo_size[0]}x{photo_size[1]} JPEG q{JPEG_QUALITY}",
            "images": count,
            "dct_scale": f"1/{dct_scale(*photo_size, size)}",
            "old_accuracy": old["accuracy"],
            "new_accuracy": new["accuracy"],
            "change_points": round(change, 3),
            "top1_agreement": float((old["top1"] == new["top1"]).mean()),
            "within_target": abs(change) <= ACCURACY_TARGET_POINTS,
            "old_decode_ms": round(old["decode_ms"], 2),
            "new_decode_ms": round(new["decode_ms"], 2),
        }
        results["accuracy"].append(row)
        print(row, flush=True)
    return results


def markdown(results: dict) -> str:
    m, s, package = results["machine"], results["settings"], results["package"]
    lines = [
        "# Camera photos through decode_image: old (full decode) vs new (DCT-scaled)",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}",
        f"- Machine: {m['nproc']} cores ({m['cpu_model']}), Python {m['python']}; load average (1/5/15 min) at the "
        f"start {m['load_average_at_start']} (shared machine). One process; CPU time of all its threads per decode, "
        f"median of {s['rounds']} rounds, old and new taking turns.",
        f"- Package: {package['name']} {package['version']} ({package['arch']}, {package['weights']})",
        "",
        "## Time per photo",
        "",
        "| photo | MB | input | DCT scale | old ms | new ms | speed-up | 1/d decode alone ms | mean abs pixel change |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["timing"]:
        floor = r.get("scaled_decode_alone_ms")
        lines.append(
            f"| {r['photo']} | {r['megabytes']} | {r['input']} | {r['dct_scale']} | {r['old_ms']:.1f} | "
            f"{r['new_ms']:.1f} | {r['speedup']:.2f}x | {'' if floor is None else f'{floor:.1f}'} | "
            f"{r['mean_abs_pixel_change']:.2f} |"
        )
    reference = results["reference_accuracy_32x32"]
    lines += [
        "",
        "The 1/d decode alone is the entropy (Huffman) decoding that no DCT scale skips, plus a small IDCT: the new "
        "way's floor for that file.",
        "",
        "## Accuracy, old vs new decode",
        "",
        f"Reference: the {reference['images']} original 32x32 test JPEGs, {reference['accuracy']:.2%}.",
        "",
        "| photos | images | DCT scale | old accuracy | new accuracy | change (points) | top-1 agreement | "
        f"within {ACCURACY_TARGET_POINTS} points | old decode ms | new decode ms |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results["accuracy"]:
        lines.append(
            f"| {r['photos']} | {r['images']} | {r['dct_scale']} | {r['old_accuracy']:.2%} | {r['new_accuracy']:.2%} "
            f"| {r['change_points']:+.2f} | {r['top1_agreement']:.2%} | {'yes' if r['within_target'] else 'NO'} | "
            f"{r['old_decode_ms']:.1f} | {r['new_decode_ms']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="trained model package for the accuracy check")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive (test/ members)")
    parser.add_argument("--count", type=int, default=1000, help="test images upscaled to 1024x1024 for accuracy")
    parser.add_argument("--count-12mp", type=int, default=300, help="test images upscaled to 4000x3000 for accuracy")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds per photo and input size (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "photos.md", help="results markdown (JSON beside)")
    args = parser.parse_args(argv)
    if not (args.package / "manifest.json").is_file():
        print(f"error: {args.package} is not a model package (no manifest.json)", file=sys.stderr)
        return 2
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    sys.exit(main())
