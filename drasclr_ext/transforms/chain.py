"""The preprocessing chain every DrasCLR workflow starts with, defined once: read the CT (and its label map), lung
mask, optional noise harmonisation, atlas registration, and optionally the anatomical patches of the encoder."""

from __future__ import annotations

from typing import Optional

from monai.transforms import Compose

from drasclr_ext.atlas import Atlas
from drasclr_ext.transforms.harmonise import HarmoniseNoised
from drasclr_ext.transforms.io import LoadCTd
from drasclr_ext.transforms.labels import LoadLabelMapd
from drasclr_ext.transforms.lung_mask import LungMaskd
from drasclr_ext.transforms.patches import AnatomicalPatchesd
from drasclr_ext.transforms.registration import AtlasRegistrationd

__all__ = ["ct_preprocessing"]


def ct_preprocessing(
    atlas: Atlas,
    harmonise: Optional[bool] = None,
    target_noise_hu: float = 30.0,
    label_key: Optional[str] = None,
    patches_k: Optional[int] = None,
) -> Compose:
    """``{"image": path[, label_key: path]}`` -> image (HU MetaTensor), ``lung_mask``, ``registration`` (and the
    label map on the image's grid, and the anatomical patches with ``patches_k`` neighbours).

    Args:
        atlas: the atlas to register to (:func:`drasclr_ext.atlas.load_atlas`).
        harmonise: True smooths noisier scans down to ``target_noise_hu`` before the model (the raw HU stay in
            ``image_raw``), False only measures the noise (see
            :class:`~drasclr_ext.transforms.harmonise.HarmoniseNoised`); None leaves the step out.
        target_noise_hu: the noise level of the harmonisation.
        label_key: also read this label map (training and evaluation).
        patches_k: also extract the anatomical patches, with this many neighbours (the encoder's input).
    """
    transforms = [LoadCTd(keys="image")]
    if label_key:
        transforms.append(LoadLabelMapd(keys=label_key, reference_key="image"))
    transforms.append(LungMaskd(keys="image", mask_key="lung_mask"))
    if harmonise is not None:
        transforms.append(
            HarmoniseNoised(keys="image", mask_key="lung_mask", target_noise_hu=target_noise_hu, enabled=harmonise)
        )
    transforms.append(AtlasRegistrationd(keys="lung_mask", result_key="registration", atlas=atlas))
    if patches_k is not None:
        transforms.append(AnatomicalPatchesd(keys="image", registration_key="registration", atlas=atlas, k=patches_k))
    return Compose(transforms)
