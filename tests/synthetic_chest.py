"""A small chest-like CT for tests: body, two lungs at -850 HU, trachea and main bronchi at -1000 HU, vessels.

Arrays are (X, Y, Z) in DICOM (LPS) index order: x grows to the patient's left, y posterior, z up; the RAS affine is
``diag(-sx, -sy, sz)`` plus an origin, as MONAI reads a usual axial series. The patient's right is +x in RAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Chest:
    hu: np.ndarray  # float32 (X, Y, Z)
    affine: np.ndarray  # 4x4 RAS
    lungs: np.ndarray  # uint8 truth: 1 right, 2 left (airways and vessels: lung where inside a lung)
    trachea: np.ndarray  # bool: trachea and main bronchi lumen
    vessels: np.ndarray  # bool: vessels inside the lungs


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from points p (..., 3) to the segment a-b."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def make_chest(
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    fov_mm: tuple[float, float, float] = (360.0, 300.0, 300.0),
    lung_gap_mm: float = 30.0,
    lungs: bool = True,
    noise_hu: float = 15.0,
    seed: int = 0,
) -> Chest:
    """Build the phantom; ``lung_gap_mm`` is the distance between the lungs' medial tips (negative: they touch)."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, sp))
    # body frame (mm): x to the patient's left, y posterior, z up; origin at the centre of the field of view
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, sp)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (x / 165.0) ** 2 + (y / 125.0) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    hu[body] = 40.0
    lung_semi = np.array([62.0, 90.0, 110.0])
    cx = lung_semi[0] + lung_gap_mm / 2.0
    truth = np.zeros(shape, dtype=np.uint8)
    if lungs:
        for label, sign in ((1, -1.0), (2, 1.0)):  # right lung at body x < 0 (patient right)
            inside = ((x - sign * cx) / lung_semi[0]) ** 2 + ((y - 5.0) / lung_semi[1]) ** 2 + (
                (z + 10.0) / lung_semi[2]
            ) ** 2 <= 1.0
            truth[inside] = label
        hu[truth > 0] = -850.0
    grid = np.stack(np.broadcast_arrays(x, y, z), axis=-1)
    carina = np.array([0.0, -5.0, 40.0])
    trachea = _segment_distance(grid, np.array([0.0, -5.0, 160.0]), carina) <= 9.0
    for sign in (-1.0, 1.0):
        trachea |= _segment_distance(grid, carina, np.array([sign * 55.0, 0.0, 15.0])) <= 6.0
    trachea &= np.broadcast_to(body, shape)
    if lungs:
        hu[trachea] = -1000.0
    vessels = np.zeros(shape, dtype=bool)
    if lungs:
        for sign in (-1.0, 1.0):
            for dz in (-50.0, 0.0, 40.0):
                vessels |= (
                    _segment_distance(grid, np.array([sign * 40.0, 10.0, dz]), np.array([sign * 95.0, 30.0, dz])) <= 4.0
                )
        vessels &= truth > 0
        hu[vessels] = 40.0
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    affine = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    affine[:3, 3] = [axes[0][0] * -1.0, axes[1][0] * -1.0, axes[2][0]]
    truth[trachea] = 0
    return Chest(hu=hu, affine=affine, lungs=truth, trachea=trachea & (truth == 0), vessels=vessels)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))
