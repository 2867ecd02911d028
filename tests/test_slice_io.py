"""The checked slice reader shared by the data-set builder and predict, on hand-made files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from unet_jax import slice_io


def _tif(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF", **kwargs)
    return buf.getvalue()


def test_path_and_file_object_read_alike(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    path = tmp_path / "a_1.tif"
    path.write_bytes(_tif(rgb))
    np.testing.assert_array_equal(slice_io.read_slice(path), rgb)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(slice_io.read_slice(f, name="archive.zip!a_1.tif"), rgb)
    assert slice_io.read_header(path) == slice_io.SliceHeader(4, 5, 3, "RGB")
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2] = True
    bits = io.BytesIO(_tif(mask))
    got = slice_io.read_slice(bits, "mask", name="m")  # 1-bit masks are accepted, as bool
    assert got.dtype == bool and (got == mask).all()


def test_refusals_name_the_file(tmp_path):
    def refused(data: bytes, kind: str, *expected: str) -> slice_io.SliceFileError:
        with pytest.raises(slice_io.SliceFileError) as info:
            slice_io.read_slice(io.BytesIO(data), kind, name="where/x.tif")
        for e in ("where/x.tif: ", *expected):
            assert e in str(info.value), (e, str(info.value))
        assert info.value.name == "where/x.tif"
        return info.value

    # A readable file that is refused has no cause; an unreadable one carries its error.
    e = refused(_tif(np.zeros((4, 4), np.uint16)), "mask", "16-bit samples", "dtype uint16")
    assert e.cause is None
    refused(_tif(np.zeros((4, 4, 3), np.uint8)), "mask", "channel layout", "single-channel")
    pages = io.BytesIO()
    frames = [Image.fromarray(np.zeros((4, 4), np.uint8)) for _ in range(2)]
    frames[0].save(pages, format="TIFF", save_all=True, append_images=frames[1:])
    refused(pages.getvalue(), "image", "multi-page", "2 pages")
    e = refused(b"not an image at all", "image", "cannot read the image")
    assert e.cause is not None
    with pytest.raises(ValueError, match="kind"):
        slice_io.read_slice(tmp_path / "x.tif", "label")  # type: ignore[arg-type]
