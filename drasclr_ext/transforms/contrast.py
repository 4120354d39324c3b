"""Is a chest CT contrast-enhanced? The HU of the blood pool (heart and great vessels) between the lungs.

Unenhanced blood measures 25-50 HU (interquartile range over anaemic and non-anaemic patients, aorta and pulmonary
artery; up to 60-70 HU at a high haematocrit). Iodinated contrast raises the aorta by 300-340 HU in the arterial
phase and still by 115-125 HU in the portal venous phase (45-55 s), so enhanced blood is above about 150 HU.
:data:`ENHANCED_BLOOD_HU` (100 HU) lies between the two with a margin on both sides.

The measure: on the lung mask's grid, the soft tissue (0-600 HU: no fat, no cortical bone or metal) that lies between
the right and the left lung on the same front-to-back line, in front of the lungs' front-to-back middle (no spine or
descending aorta), at the heart's height (20-60 % of the lungs' height from their base); its 75th percentile, which
falls in the blood of the heart chambers and great vessels when they are enhanced (they are most of that tissue)
and stays at soft-tissue values when they are not.
"""

from __future__ import annotations

import math

import numpy as np

from drasclr_ext.geometry import axis_towards, voxel_spacing

ENHANCED_BLOOD_HU = 100.0
HEART_LEVELS = (0.2, 0.6)  # of the lungs' height, from their base
SOFT_TISSUE_HU = (0.0, 600.0)
PERCENTILE = 75.0
MIN_BLOOD_POOL_ML = 20.0  # less mediastinum than this: no measure (NaN)


def mediastinum(labels: np.ndarray, affine: np.ndarray, right: int = 1, left: int = 2) -> np.ndarray:
    """Voxels between the right and the left lung on their left-right line, in front of the lungs' front-to-back
    middle, at heart levels (see the module's docstring); bool, the grid of ``labels``."""
    ax_lr, sign_lr = axis_towards(affine, 0)
    ax_ap, sign_ap = axis_towards(affine, 1)
    ax_si, sign_si = axis_towards(affine, 2)
    lab = np.moveaxis(np.asarray(labels), (ax_lr, ax_ap, ax_si), (0, 1, 2))
    if sign_lr > 0:  # index 0 at the patient's right
        lab = lab[::-1]
    if sign_ap < 0:  # index 0 at the back
        lab = lab[:, ::-1]
    if sign_si < 0:  # index 0 at the bottom
        lab = lab[:, :, ::-1]
    out = np.zeros(lab.shape, dtype=bool)
    levels = np.flatnonzero((lab > 0).any(axis=(0, 1)))
    lungs_ap = np.flatnonzero((lab > 0).any(axis=(0, 2)))
    if levels.size == 0 or not ((lab == right).any() and (lab == left).any()):
        return np.zeros(labels.shape, dtype=bool)
    low = levels[0] + int(HEART_LEVELS[0] * (levels[-1] - levels[0]))
    high = levels[0] + int(math.ceil(HEART_LEVELS[1] * (levels[-1] - levels[0])))
    front = int(np.ceil(0.5 * (lungs_ap[0] + lungs_ap[-1])))  # rows from the lungs' middle to the front
    part = lab[:, front:, low : high + 1]
    after_right = np.maximum.accumulate(part == right, axis=0)  # right lung at a lower index on this line
    before_left = np.maximum.accumulate((part == left)[::-1], axis=0)[::-1]
    out[:, front:, low : high + 1] = after_right & before_left & (part == 0)
    if sign_si < 0:
        out = out[:, :, ::-1]
    if sign_ap < 0:
        out = out[:, ::-1]
    if sign_lr > 0:
        out = out[::-1]
    return np.ascontiguousarray(np.moveaxis(out, (0, 1, 2), (ax_lr, ax_ap, ax_si)))


def blood_pool_hu(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> float:
    """The 75th percentile HU of the mediastinal soft tissue at heart levels (see the module's docstring), or NaN
    when there is less than ``MIN_BLOOD_POOL_ML`` of it (lungs missing, scan cut above the heart)."""
    region = mediastinum(labels, affine)
    values = np.asarray(hu)[region]
    values = values[(values > SOFT_TISSUE_HU[0]) & (values < SOFT_TISSUE_HU[1])]
    voxel_ml = float(np.prod(voxel_spacing(affine))) / 1000.0
    if values.size * voxel_ml < MIN_BLOOD_POOL_ML:
        return math.nan
    return round(float(np.percentile(values, PERCENTILE)), 1)
