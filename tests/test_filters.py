"""pdscli.precondition.filters and pdscli.images: folder statistics (streamed, parallel, deterministic), writing, previews."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pdscli.precondition import filters as lib
from pdscli.errors import PdsError
from pdscli.images import from_uint8, load_image, make_grid, save_png, to_uint8
from pdscli.precondition import compute_statistics, load_filters

from conftest import full_disk_at, tiny_onnx


def write_images(folder, n=5, size=8, *, seed=0, fmt="png", shape=None):
    """n random RGB images; returns their exact float values [n, 3, size, size]."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        a = rng.integers(0, 256, shape or (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"img{i:03d}.{fmt}")
        arrays.append(from_uint8(a))
    return np.stack(arrays)


def test_statistics_match_the_reference_recipe(tmp_path):
    x = write_images(tmp_path / "d", n=5)
    stats = lib.folder_statistics(tmp_path / "d", size=8)
    t = torch.from_numpy(x).double()
    want_freq = torch.log1p((torch.fft.fft2(t).abs() ** 2).mean(0)).numpy()
    want_space = (t**2).mean(0).numpy()
    np.testing.assert_allclose(stats.freq, want_freq, rtol=1e-5)
    np.testing.assert_allclose(stats.space, want_space, rtol=1e-5)
    assert stats.count == 5 and stats.shape == (3, 8, 8) and stats.source == str(tmp_path / "d")


def test_streams_in_chunks_and_workers_do_not_change_the_result(tmp_path, monkeypatch):
    write_images(tmp_path / "d", n=7)
    seen = []
    real = compute_statistics

    def spy(batches, **kw):
        def tap():
            for b in batches:
                seen.append(b.shape[0])
                yield b

        return real(tap(), **kw)

    monkeypatch.setattr(lib, "compute_statistics", spy)
    monkeypatch.setattr(lib, "CHUNK", 3)
    one = lib.folder_statistics(tmp_path / "d", size=8, workers=1)
    assert seen == [3, 3, 1]  # never the whole folder at once
    three = lib.folder_statistics(tmp_path / "d", size=8, workers=3)
    np.testing.assert_array_equal(one.freq, three.freq)
    np.testing.assert_array_equal(one.space, three.space)


def test_recursive_sorted_and_limit(tmp_path):
    x = write_images(tmp_path / "d" / "a", n=3, seed=1)
    write_images(tmp_path / "d" / "b", n=3, seed=2)
    stats = lib.folder_statistics(tmp_path / "d", size=8, limit=3)
    assert stats.count == 3
    np.testing.assert_allclose(stats.space, (x.astype(np.float64) ** 2).mean(0), rtol=1e-5)  # a/ sorts first
    assert lib.folder_statistics(tmp_path / "d", size=8).count == 6


def test_resize_and_centre_crop_any_shape_and_format(tmp_path):
    write_images(tmp_path / "d", n=2, shape=(20, 12, 3), fmt="jpg")
    write_images(tmp_path / "d", n=1, shape=(5, 9, 3), fmt="bmp", seed=3)
    stats = lib.folder_statistics(tmp_path / "d", size=8, channels=1)
    assert stats.shape == (1, 8, 8) and stats.count == 3


def test_load_image_crops_the_centre(tmp_path):
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, 4:12] = 255  # the centre square is white, the sides black
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", size=8)
    assert x.shape == (3, 8, 8) and x.min() == 1.0


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    write_images(tmp_path / "d", n=2)
    (tmp_path / "d" / "broken.png").write_bytes(b"not a png")
    warnings = []
    stats = lib.folder_statistics(tmp_path / "d", size=8, warn=warnings.append)
    assert stats.count == 2
    assert warnings == ["skipped 1 unreadable file(s) of 3: broken.png"]


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"x{i}.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(PdsError, match="none of the 3 image files"):
        lib.folder_statistics(tmp_path / "d", size=8)


def test_empty_or_missing_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(PdsError, match="no images"):
        lib.folder_statistics(tmp_path / "empty", size=8)
    with pytest.raises(PdsError, match="no such folder"):
        lib.folder_statistics(tmp_path / "missing", size=8)


def test_write_filters_npz_npy_preview_and_no_overwrite(tmp_path):
    write_images(tmp_path / "d", n=3)
    stats = lib.folder_statistics(tmp_path / "d", size=8)
    out = tmp_path / "masks" / "d-8.npz"
    paths = lib.write_filters(stats, out, npy=True)
    back = load_filters(out)
    np.testing.assert_array_equal(back.freq, stats.freq)
    assert back.count == 3
    freq_npy, space_npy = np.load(paths["freq_npy"]), np.load(paths["space_npy"])
    assert paths["freq_npy"] == tmp_path / "masks" / "d-8" / "freq_mask.npy"
    assert freq_npy.shape == (3, 8, 8) and freq_npy.dtype == np.float32
    np.testing.assert_array_equal(freq_npy, stats.freq)
    np.testing.assert_array_equal(space_npy, stats.space)
    with Image.open(paths["preview"]) as im:
        assert im.mode == "L" and im.width > 2 * im.height - 1
    before = out.read_bytes()
    with pytest.raises(PdsError, match="--force"):
        lib.write_filters(stats, out)
    assert out.read_bytes() == before
    lib.write_filters(stats, out, force=True)


def test_preview_puts_dc_in_the_centre(tmp_path):
    from pdscli.precondition import Filters

    freq = np.zeros((1, 8, 8), np.float32)
    freq[0, 0, 0] = 1.0  # DC, unshifted layout
    f = Filters(freq=freq, space=np.ones((1, 8, 8), np.float32), size=8, channels=1)
    a = np.asarray(lib.preview_image(f, min_side=8))
    assert a[4, 4] == 255 and a[0, 0] == 0


def test_default_out_path():
    assert str(lib.default_out_path("/data/ffhq/", 256)) == "masks/ffhq-256.npz"


def test_images_helpers_round_trip(tmp_path):
    x = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    save_png(tmp_path / "a.png", x)
    with Image.open(tmp_path / "a.png") as im:
        back = from_uint8(np.asarray(im))
    assert np.abs(back - x).max() <= 0.5 / 255 + 1e-6
    assert to_uint8(np.array([[[0.0, 1.0, 0.5, 2.0, -1.0]]])).ravel().tolist() == [0, 255, 128, 255, 0]
    grid = make_grid(np.zeros((5, 1, 2, 2)), padding=1)
    assert grid.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    big = make_grid(np.arange(8.0).reshape(2, 1, 2, 2), padding=0, min_cell=5)  # x2, nearest
    assert big.shape == (1, 4, 8) and big[0, 1, 1] == 0.0 and big[0, 2, 2] == 3.0


def test_engine_shape_from_onnx_metadata(tmp_path):

    from pdscli.engines.files import engine_shape

    assert engine_shape(tiny_onnx(tmp_path / "t.onnx", size=16, channels=1)) == (16, 1)


def test_resolve_shape_rules(tmp_path):

    from pdscli.cli.filters import resolve_shape

    engine = tiny_onnx(tmp_path / "t.onnx", size=16)
    assert resolve_shape(size=None, channels=None, engine=engine) == (16, 3)
    assert resolve_shape(size=32, channels=None) == (32, 3)
    with pytest.raises(PdsError, match="--size"):
        resolve_shape(size=None, channels=None)
    with pytest.raises(PdsError, match="contradicts"):
        resolve_shape(size=32, channels=None, engine=engine)


# ---- every Pillow mode decodes to [0, 1], or the file is refused ----


def _grey(value: float, mode: str, size: int = 6) -> Image.Image:
    """A flat image at `value` (in [0, 1]) stored in Pillow mode `mode`."""
    if mode == "F":
        return Image.fromarray(np.full((size, size), value, np.float32))
    if mode in ("I;16", "I"):
        im = Image.fromarray(np.full((size, size), round(value * 65535), np.uint16))
        return im if mode == "I;16" else im.convert("I")
    level = round(value * 255)
    if mode == "P":
        im = Image.new("P", (size, size), 0)
        im.putpalette([level, level, level] * 256)
        return im
    if mode == "LA":
        return Image.new("LA", (size, size), (level, 7))
    if mode == "RGBA":
        return Image.new("RGBA", (size, size), (level, level, level, 7))
    if mode == "CMYK":
        return Image.new("CMYK", (size, size), (0, 0, 0, 255 - level))
    return Image.new(mode, (size, size), level if mode == "L" else (level,) * 3)


@pytest.mark.parametrize(
    "mode, suffix",
    [("I;16", "png"), ("I;16", "tif"), ("I", "tif"), ("F", "tif"), ("L", "png"), ("RGB", "png"), ("P", "png"),
     ("LA", "png"), ("RGBA", "png"), ("CMYK", "tif")],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_pillow_mode_decodes_to_the_unit_range(tmp_path, mode, suffix, channels):
    """Mid-grey is 0.5 (space statistic 0.25) whatever the file's bit depth: a 16-bit PNG once gave 1.0, a float TIFF 0.0."""
    path = tmp_path / "d" / f"grey.{suffix}"
    path.parent.mkdir()
    _grey(0.5, mode).save(path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really holds that mode
    x = load_image(path, size=4, channels=channels)
    assert x.shape == (channels, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, 0.5, atol=1 / 255)
    stats = lib.folder_statistics(path.parent, size=4, channels=channels)
    np.testing.assert_allclose(stats.space, 0.25, atol=2 / 255)


def test_high_depth_images_keep_their_levels(tmp_path):
    """16 bits are not cut to 8: neighbouring 16-bit levels stay apart, and a ramp stays a ramp."""
    ramp = np.tile(np.linspace(0, 65535, 8).round().astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = load_image(tmp_path / "ramp.png", size=8, channels=1)[0]
    np.testing.assert_allclose(x, ramp / 65535.0, atol=1e-6)


@pytest.mark.parametrize("value", [1.5, -0.25, float("nan")])
def test_float_images_outside_the_unit_range_are_refused(tmp_path, value):
    path = tmp_path / "bad.tif"
    Image.fromarray(np.full((4, 4), value, np.float32)).save(path)
    with pytest.raises(PdsError, match="bad.tif") as e:
        load_image(path, size=4)
    assert "\n" not in str(e.value)


# ---- a set of outputs is written whole or not at all ----


def test_a_full_disk_leaves_no_part_of_the_output_set(tmp_path, monkeypatch):
    write_images(tmp_path / "d", n=3)
    stats = lib.folder_statistics(tmp_path / "d", size=8)
    out = tmp_path / "masks" / "d.npz"

    full_disk_at(monkeypatch, ".npy")  # the last files of the set
    with pytest.raises(PdsError, match="(?i)no space left") as e:
        lib.write_filters(stats, out, npy=True)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.joinpath("masks").rglob("*") if p.is_file()) == []
    monkeypatch.undo()
    lib.write_filters(stats, out, npy=True)  # a rerun needs no --force: nothing was left behind


