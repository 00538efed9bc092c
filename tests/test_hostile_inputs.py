"""Hostile image inputs: decompression bombs, malformed serving requests, fuzzed files.

Every place that decodes images (`app.predict`'s `read_image`, the data pipeline and image
folders, the SavedModel's `serving_bytes`) reads the size from the header and refuses an
image over `--max_pixels` before decoding it. The fuzz test's length is `FUZZ_CASES`
(default 300; e.g. `FUZZ_CASES=5000 pytest tests/test_hostile_inputs.py -k fuzz`), its seed
`FUZZ_SEED` (default 0): a failure names the case, and the same seed rebuilds it.
"""

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from app import predict_lib
from common.errors import first_line
from export import image_header, saved_model
from models import preprocessing
from tests.helpers import REPO, encode, random_images, tiny_model

SIZE = 16
CLASSES = [f"class_{i}" for i in range(10)]
FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "300"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "0"))


def png_bomb(width: int = 20000, height: int = 20000, rows: int = 3000) -> bytes:
    """A valid PNG header declaring `width` x `height` RGB, with `rows` rows of zeros
    (deflate makes them about 1000x smaller): a small file that decodes to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * ((width * 3 + 1) * rows), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def pil_encode(image: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def served_base(tmp_path_factory) -> str:
    """A tiny classifier exported as a SavedModel base path (version 1)."""
    base = str(tmp_path_factory.mktemp("hostile") / "saved_model")
    saved_model.export_saved_model(
        tiny_model(10, SIZE), CLASSES, preprocessing.cifar(SIZE), base, warmup=False
    )
    return base


def test_header_sizes_of_every_format_match_the_decoded_images():
    image = random_images(1, 23, 37, seed=3)[0]
    rgba = np.dstack([image, np.full((23, 37, 1), 200, np.uint8)])
    files = {fmt: pil_encode(image, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")}
    lossless, extended = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(lossless, "WEBP", lossless=True)
    Image.fromarray(rgba).save(extended, "WEBP")  # alpha: the VP8X header
    files.update(webp_lossless=lossless.getvalue(), webp_alpha=extended.getvalue())
    assert files["webp_alpha"][12:16] == b"VP8X" and files["webp_lossless"][12:16] == b"VP8L"
    for name, data in files.items():
        assert image_header.header_size(data).numpy().tolist() == [23, 37], name
        assert image_header.decode_image(data).shape == (23, 37, 3), name
    # A top-down BMP stores a negative height.
    bmp = bytearray(files["BMP"])
    bmp[22:26] = struct.pack("<i", -23)
    assert image_header.header_size(bytes(bmp)).numpy().tolist() == [23, 37]


def test_images_over_the_limit_are_refused_everywhere_with_their_size(tmp_path, served_base):
    small = encode(random_images(1, 30, 40)[0], "png")  # 1200 pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image of 40x30 pixels .* 1000"):
        image_header.decode_image(small, max_pixels=1000)
    assert image_header.decode_image(small, max_pixels=1200).shape == (30, 40, 3)
    path = tmp_path / "small.png"
    path.write_bytes(small)
    with pytest.raises(predict_lib.ImageError, match="40x30 pixels is over the limit of 1000"):
        predict_lib.read_image(str(path), max_pixels=1000)

    # The export records its limit and its signatures enforce it.
    base = str(tmp_path / "limited")
    version = saved_model.export_saved_model(
        tiny_model(10, SIZE), CLASSES, preprocessing.cifar(SIZE), base, False, max_pixels=1000
    )
    with open(os.path.join(version, saved_model.LIMITS_FILE)) as f:
        assert json.load(f) == {"max_pixels": 1000}
    served = saved_model.load_serving(base)
    with pytest.raises(tf.errors.InvalidArgumentError, match="40x30 pixels is over the limit"):
        served.signatures["serving_bytes"](image_bytes=tf.constant([small]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="40x30 pixels is over the limit"):
        served.signatures["serving_default"](images=tf.zeros([1, 30, 40, 3], tf.uint8))
    assert served.predict(np.zeros((1, 25, 40, 3), np.uint8))["classes"].shape == (1,)


def _gif_with_screen(width: int, height: int, screen: tuple[int, int]) -> bytes:
    """A one-frame `width` x `height` GIF whose header declares another screen size."""
    data = bytearray(pil_encode(random_images(1, height, width)[0], "GIF"))
    data[6:10] = struct.pack("<HH", *screen)
    return bytes(data)


def test_gif_frames_larger_than_the_screen_or_many_frames_are_counted():
    # The decoder returns the first frame, whatever size the screen in the header says.
    crossed = _gif_with_screen(20, 100, screen=(100, 20))
    assert image_header.header_size(crossed).numpy().tolist() == [100, 20]
    assert image_header.decode_image(crossed).shape == (100, 20, 3)
    # A frame far larger than its screen: refused by the frame's size.
    hidden = _gif_with_screen(1500, 1000, screen=(10, 10))
    with pytest.raises(tf.errors.InvalidArgumentError, match="1500x1000 pixels is over"):
        image_header.decode_image(hidden, max_pixels=1_000_000)
    # giflib reads every frame, though only the first is returned: all of them count.
    frames = [Image.fromarray(im) for im in random_images(5, 50, 60, seed=2)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    assert image_header.decode_image(out.getvalue(), max_pixels=15000).shape == (50, 60, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="GIF frames of 15000 pixels"):
        image_header.decode_image(out.getvalue(), max_pixels=14999)


def test_image_folder_names_the_file_over_the_limit(tmp_path):
    from app import data

    for i, label in enumerate(["cat", "cat", "dog", "dog"]):
        (tmp_path / label).mkdir(exist_ok=True)
        size = (30, 40) if i == 3 else (8, 8)
        (tmp_path / label / f"{i}.png").write_bytes(encode(random_images(1, *size)[0], "png"))
    config = data.DataConfig(data_dir=str(tmp_path), validation_split=0.5, max_pixels=1000)
    with pytest.raises(data.DataError, match=r"3\.png: image of 40x30 pixels .*--max_pixels"):
        data.load(config)


BOMB_SCRIPT = """
import json, resource, sys, time
import numpy as np, tensorflow as tf
from app import predict_lib
from app.data import decode, pipeline
from app.data.types import Examples
from common.errors import first_line
from export import saved_model
from models import preprocessing

base, bomb_path, good_path = sys.argv[1:4]
good, bomb = open(good_path, "rb").read(), open(bomb_path, "rb").read()
served = saved_model.load_serving(base)
pre = preprocessing.cifar(16)

def files(*paths):
    return Examples(np.zeros(len(paths), np.int64), files=np.array(paths, dtype=object))

cases = {
    "app.predict": lambda: predict_lib.read_image(bomb_path),
    "serving_bytes": lambda: served.signatures["serving_bytes"](
        image_bytes=tf.constant([good, bomb])),
    "pipeline": lambda: list(pipeline.eval_dataset(files(good_path, bomb_path), pre, 2)),
    "image_folder": lambda: decode.decode_if_fits(
        files(good_path, bomb_path), True, decode.memory_budget()),
}
# Every path runs once on a good image first: the peak measured below is the bomb's alone.
predict_lib.read_image(good_path)
served.signatures["serving_bytes"](image_bytes=tf.constant([good]))
list(pipeline.eval_dataset(files(good_path), pre, 1))
results = {}
for name, run in cases.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        run()
        error = None
    except Exception as e:
        error = type(e).__name__ + ": " + first_line(e)
    results[name] = {
        "seconds": time.perf_counter() - start,
        "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
        "error": error,
    }
print(json.dumps(results))
"""


@pytest.mark.slow
def test_png_bomb_is_refused_fast_without_allocating_it(tmp_path, served_base):
    bomb = png_bomb()
    assert len(bomb) < 2 << 20
    # A genuine PNG header, as Pillow reads it: 400 megapixels, 1.2 GB once decoded.
    with pytest.raises(Image.DecompressionBombError, match="400000000 pixels"):
        Image.open(io.BytesIO(bomb))
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "good.png").write_bytes(encode(random_images(1, 24, 24)[0], "png"))
    result = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, served_base, "bomb.png", "good.png"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))
    assert set(results) == {"app.predict", "serving_bytes", "pipeline", "image_folder"}
    for name, measured in results.items():
        assert "20000x20000 pixels is over the limit of 40000000" in measured["error"], name
        assert measured["seconds"] < 2.0, (name, measured)
        assert measured["peak_growth_mb"] < 200, (name, measured)


MALFORMED_SCRIPT = """
import json, sys
import numpy as np, tensorflow as tf

base, good_path, jpeg_path = sys.argv[1:4]
good, jpeg = open(good_path, "rb").read(), open(jpeg_path, "rb").read()
loaded = tf.saved_model.load(base + "/1")
by_pixels, by_bytes = loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]
pixels = tf.io.decode_png(good, channels=3)[tf.newaxis]
reference = (by_pixels(images=pixels)["classes"].numpy().tolist(),
             by_bytes(image_bytes=tf.constant([good]))["classes"].numpy().tolist())
requests = {
    "pixels float32": lambda: by_pixels(images=tf.cast(pixels, tf.float32)),
    "pixels rank 3": lambda: by_pixels(images=pixels[0]),
    "pixels rank 5": lambda: by_pixels(images=pixels[tf.newaxis]),
    "pixels 4 channels": lambda: by_pixels(images=tf.concat([pixels, pixels[..., :1]], -1)),
    "pixels empty batch": lambda: by_pixels(images=tf.zeros([0, 24, 24, 3], tf.uint8)),
    "bytes int32": lambda: by_bytes(image_bytes=tf.constant([1, 2])),
    "bytes rank 2": lambda: by_bytes(image_bytes=tf.constant([[good]])),
    "bytes scalar": lambda: by_bytes(image_bytes=tf.constant(good)),
    "bytes empty batch": lambda: by_bytes(image_bytes=tf.constant([], tf.string)),
    "bytes one broken among good": lambda: by_bytes(
        image_bytes=tf.constant([good, jpeg[: len(jpeg) // 2], good])),
    "bytes not an image": lambda: by_bytes(image_bytes=tf.constant([b"hello, world"])),
    "bytes empty string": lambda: by_bytes(image_bytes=tf.constant([b""])),
    "bytes truncated jpeg": lambda: by_bytes(image_bytes=tf.constant([jpeg[: len(jpeg) // 2]])),
    "bytes jpeg header only": lambda: by_bytes(image_bytes=tf.constant([jpeg[:20]])),
}
results = {}
for name, request in requests.items():
    try:
        request()
        error = None
    except Exception as e:
        error = type(e).__name__ + ": " + str(getattr(e, "message", e))
    after = (by_pixels(images=pixels)["classes"].numpy().tolist(),
             by_bytes(image_bytes=tf.constant([good]))["classes"].numpy().tolist())
    results[name] = {"error": error, "answers_next": after == reference}
print(json.dumps(results))
"""


@pytest.mark.slow
def test_malformed_requests_get_an_error_and_the_model_keeps_answering(tmp_path, served_base):
    image = random_images(1, 24, 24, seed=5)[0]
    (tmp_path / "good.png").write_bytes(encode(image, "png"))
    (tmp_path / "photo.jpg").write_bytes(encode(random_images(1, 64, 64, seed=6)[0], "jpeg"))
    # -I: isolated mode, the repository is not importable: plain TensorFlow, as TF Serving.
    result = subprocess.run(
        [sys.executable, "-I", "-c", MALFORMED_SCRIPT, served_base, "good.png", "photo.jpg"],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {  # what each error says
        "pixels float32": "uint8",
        "pixels rank 3": "expected shape [?,?,?,3]",
        "pixels rank 5": "expected shape [?,?,?,3]",
        "pixels 4 channels": "expected shape [?,?,?,3]",
        "pixels empty batch": "empty batch",
        "bytes int32": "string",
        "bytes rank 2": "expected shape [?]",
        "bytes scalar": "expected shape [?]",
        "bytes empty batch": "empty batch",
        "bytes one broken among good": "JPEG",
        "bytes not an image": "not a JPEG, PNG, GIF, BMP or WebP image",
        "bytes empty string": "not a JPEG, PNG, GIF, BMP or WebP image",
        "bytes truncated jpeg": "JPEG",
        "bytes jpeg header only": "JPEG",
    }
    assert set(results) == set(expected)
    for name, outcome in results.items():
        assert outcome["error"] is not None, f"{name}: answered instead of refused"
        assert expected[name] in outcome["error"], (name, outcome["error"])
        assert outcome["answers_next"], f"{name}: the next good request was answered wrongly"


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation: bit flips, a truncation, a header edit or a spliced copy."""
    out = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for _ in range(rng.integers(1, 9)):
            i = rng.integers(len(out))
            out[i] ^= 1 << rng.integers(8)
    elif kind == 1:
        out = out[: rng.integers(len(out))]
    elif kind == 2:  # where sizes, chunk lengths and markers live
        for _ in range(rng.integers(1, 5)):
            i = rng.integers(min(64, len(out)))
            out[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.integers(256)])
    else:
        i, j = sorted(rng.integers(len(out), size=2))
        out = out[:j] + out[i:j] + out[j:]
    return bytes(out)


def test_fuzzed_images_get_a_prediction_or_one_clear_error(tmp_path, served_base):
    images = random_images(2, 20, 28, seed=9)
    originals = [pil_encode(im, fmt) for im in images for fmt in ("JPEG", "PNG", "GIF", "BMP")]
    serving_bytes = saved_model.load_serving(served_base).signatures["serving_bytes"]
    rng = np.random.default_rng(FUZZ_SEED)
    path = tmp_path / "fuzzed"
    outcomes = {"decoded": 0, "refused": 0}
    for case in range(FUZZ_CASES):
        data = _mutate(originals[case % len(originals)], rng)
        where = f"case {case} (FUZZ_SEED={FUZZ_SEED})"
        path.write_bytes(data)
        try:
            decoded = predict_lib.read_image(str(path)).shape
        except predict_lib.ImageError as e:
            decoded = None
            assert "\n" not in str(e) and str(e).startswith(str(path)), (where, str(e))
        try:
            served = serving_bytes(image_bytes=tf.constant([data]))["classes"].shape
        except tf.errors.InvalidArgumentError as e:
            served = None
            assert first_line(e), where
        # One decoder behind both: they agree on what is an image.
        assert (decoded is None) == (served is None), (where, decoded, served)
        outcomes["refused" if decoded is None else "decoded"] += 1
    print(outcomes)
    assert outcomes["decoded"] and outcomes["refused"]  # the mutations exercise both


def test_max_pixels_flag_reaches_the_data_config():
    from absl import flags

    from app import data_flags

    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["program"])
    assert data_flags.data_config_from_flags(0, values).max_pixels == 40_000_000
    values(["program", "--max_pixels=1234"])
    assert data_flags.data_config_from_flags(0, values).max_pixels == 1234
