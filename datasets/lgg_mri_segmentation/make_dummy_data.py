"""Write the dummy data of the ``lgg_mri_segmentation`` builder (synthetic, never real images).

    python -m datasets.lgg_mri_segmentation.make_dummy_data [DEST]   # default: dummy_data/ here

The dummy data is a small kaggle_3m-layout folder written by :mod:`unet_jax.synthetic`
(generated rather than committed: the repository holds no .tif files). Tests write it into
temporary folders with :func:`make_dummy_data`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from unet_jax.synthetic import write_synthetic_kaggle3m

DUMMY_DATA_DIR = Path(__file__).resolve().parent / "dummy_data"


def make_dummy_data(dest: Path | str = DUMMY_DATA_DIR, *, layout: str = "kaggle_3m") -> Path:
    """Write the dummy data (5 patients of 5 to 8 slices, 256x256) into ``dest``.

    Args:
      dest: the manual directory to write (``dest/kaggle_3m``, or the archive layouts).
      layout: ``"kaggle_3m"``, ``"kaggle-zip"`` (unpacked archive) or ``"zip"``; see
        :func:`unet_jax.synthetic.write_synthetic_kaggle3m`.

    Returns:
      ``dest``, to pass as the builder's manual directory.
    """
    write_synthetic_kaggle3m(dest, num_patients=5, slices=(5, 8), size=256, seed=3, layout=layout)  # type: ignore[arg-type]
    return Path(dest)


if __name__ == "__main__":
    out = make_dummy_data(sys.argv[1] if len(sys.argv) > 1 else DUMMY_DATA_DIR)
    print(f"dummy data written to {out}")
