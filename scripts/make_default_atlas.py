"""Generate the project's default atlas as ``drasclr_ext/assets/default_atlas_*`` (deterministic; output committed).

The atlas is the phantom generator's average lungs at 1 mm (``canonical_lung_mask``), binarised, with the landmark
patch corners of ``build_landmarks`` (32^3 patches, step 26, more than 10 % lung), exactly as the DrasCLR reference
built its COPDGene atlas. Usage: ``python scripts/make_default_atlas.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from drasclr_ext.atlas import (
    ASSETS_DIR,
    ATLAS_CORNERS_FILE,
    ATLAS_MASK_FILE,
    DEFAULT_ATLAS_FILES,
    build_landmarks,
)
from drasclr_ext.data.phantom import canonical_lung_mask
from drasclr_ext.fileio import sha256sum


def make_default_atlas() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The default atlas: uint8 lung mask (0/1) at 1 mm, its RAS affine and the (L, 3) landmark corners."""
    labels, affine = canonical_lung_mask(1.0)
    mask = (labels > 0).astype(np.uint8)
    return mask, affine, build_landmarks(mask)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_default_atlas(out: Path = ASSETS_DIR) -> None:
    mask, affine, corners = make_default_atlas()
    out.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(mask, affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    # gzip with mtime=0 so the committed bytes do not change from one run to the next
    mask_path, corners_path = out / DEFAULT_ATLAS_FILES[ATLAS_MASK_FILE], out / DEFAULT_ATLAS_FILES[ATLAS_CORNERS_FILE]
    _write_atomic(mask_path, gzip.compress(image.to_bytes(), compresslevel=9, mtime=0))
    tmp = out / f".{corners_path.name}.tmp.npy"
    np.save(tmp, corners)
    os.replace(tmp, corners_path)
    for path in (mask_path, corners_path):
        print(f"{path}  {path.stat().st_size} bytes  sha256 {sha256sum(path)}")
    print(f"mask {mask.shape}, {len(corners)} landmarks")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR)
    write_default_atlas(parser.parse_args().out)
