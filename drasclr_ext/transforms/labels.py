"""Reading emphysema label maps (0 outside lung, 1 normal, 2 centrilobular, 3 paraseptal, 4 panlobular) onto the grid
of their image."""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from drasclr_ext.errors import InputImageError
from drasclr_ext.geometry import array_and_affine

__all__ = ["LoadLabelMapd"]


class LoadLabelMapd(MapTransform):
    """Read label maps (NIfTI/NRRD/MHA) as uint8 (X, Y, Z) MetaTensors and check they lie on the grid of
    ``d[reference_key]`` (same shape, affine within ``atol`` mm)."""

    def __init__(
        self, keys: KeysCollection = "label", reference_key: str = "image", atol: float = 1e-3, allow_missing_keys=False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.atol = float(atol)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.transforms import LoadImage

        d = dict(data)
        _, ref_affine = array_and_affine(d[self.reference_key])
        ref_shape = tuple(d[self.reference_key].shape[-3:])
        for key in self.key_iterator(d):
            source = d[key]
            try:
                label = LoadImage(image_only=True, dtype=np.uint8)(source)
            except Exception as exc:
                raise InputImageError(
                    f"cannot read the label map {source} ({exc}); give a NIfTI/NRRD/MHA file"
                ) from exc
            if tuple(label.shape[-3:]) != ref_shape or not np.allclose(
                label.affine.numpy(), ref_affine, atol=self.atol
            ):
                raise InputImageError(
                    f"the label map {source} (shape {tuple(label.shape)}) does not lie on the grid of its image "
                    f"(shape {ref_shape}): resample the labels onto the image (nearest neighbour) first"
                )
            values = np.unique(np.asarray(label))
            if values.max() > 4:
                raise InputImageError(
                    f"the label map {source} has values {values.tolist()}; emphysema labels are 0 outside lung, "
                    "1 normal, 2 centrilobular, 3 paraseptal, 4 panlobular"
                )
            d[key] = MetaTensor(torch.as_tensor(np.asarray(label), dtype=torch.uint8), affine=label.affine)
        return d
