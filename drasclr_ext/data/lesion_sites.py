"""Where the inserted lesions go: centrilobular (CLE) clusters deep in the upper zones, paraseptal (PSE) cysts in one
layer along the upper-zone pleura, one panlobular (PLE) region in a lower zone. Sites over vessels, airways or
existing lucencies are not used, and lesions keep apart."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from scipy import ndimage as ndi

from drasclr_ext.data.lesion_geometry import ScanGeometry

__all__ = ["CLE", "PLE", "PSE", "Placement", "parenchyma_weight", "place_cle", "place_ple", "place_pse"]

CLE, PSE, PLE = 2, 3, 4
_VESSEL_LO, _VESSEL_HI = -700.0, -600.0  # parenchyma weight 1 below, 0 above (vessels, walls, dense lung)
_CLE_SPREAD_MM = 8.0  # blobs of a cluster lie within this of its centre


def parenchyma_weight(hu: np.ndarray) -> np.ndarray:
    """1 for parenchyma (HU <= -700), 0 for vessels, walls and dense lung (HU >= -600), linear between."""
    return np.clip((_VESSEL_HI - hu) / (_VESSEL_HI - _VESSEL_LO), 0.0, 1.0).astype(np.float32)


def _lung_heights(lung: np.ndarray, zw: np.ndarray) -> dict[int, tuple[float, float]]:
    """World z (mm) of each lung's lowest and highest voxel centre."""
    out = {}
    for label in (int(v) for v in np.unique(lung) if v != 0):
        z = zw[lung == label]
        out[label] = (float(z.min()), float(z.max()))
    return out


class Placement:
    """The scan, its lung, depth, world z and each lung's height range while lesions are placed: checks candidate
    sites and keeps placed ones apart."""

    def __init__(self, geo: ScanGeometry, hu: np.ndarray, lung: np.ndarray, depth: np.ndarray) -> None:
        self.geo, self.hu, self.lung, self.depth = geo, hu, lung, depth
        self.zw = geo.world_z()
        self.heights = _lung_heights(lung, self.zw)
        self.balls: list[tuple[np.ndarray, float]] = []  # every placed ball, to keep lesions apart

    def free(self, centre: np.ndarray, radius: float, gap: float) -> bool:
        return all(np.linalg.norm(c - centre) >= r + radius + gap for c, r in self.balls)

    def site_ok(self, centre: np.ndarray, radius: float, inside: float = 0.95) -> Optional[tuple]:
        """The ball's fraction box if it lies in the lung (share ``inside``), in parenchyma (not vessels) and not in
        an existing lucency (airway, bulla): mean HU above -930; else None."""
        bf = self.geo.ball_fraction(centre, radius)
        if bf is None:
            return None
        box, frac = bf
        total = float(frac.sum())
        if total <= 0:
            return None
        lung = self.lung[box] > 0
        if float(frac[lung].sum()) / total < inside:
            return None
        hu = self.hu[box]
        if float((frac * parenchyma_weight(hu)).sum()) / total < 0.85:
            return None
        if float((frac * hu).sum()) / total < -930.0:
            return None
        return bf


def _upper_third(z0: float, z1: float) -> float:
    """World z (mm) where the upper third of a lung from ``z0`` to ``z1`` begins."""
    return z0 + (z1 - z0) * 2.0 / 3.0


def _ball_in_ball(rng: np.random.Generator, radius: float) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v) * radius * float(rng.uniform()) ** (1.0 / 3.0)


def _cle_blob(
    rng: np.random.Generator, placement: Placement, centre: np.ndarray, label: int, z_upper: float, min_depth: float
) -> list[tuple[np.ndarray, float]]:
    """One blob near a cluster's ``centre`` and its two satellites, or nothing after 15 attempts."""
    geo = placement.geo
    for _attempt in range(15):
        r = float(rng.uniform(1.5, 5.0))
        c = centre + _ball_in_ball(rng, _CLE_SPREAD_MM)
        idx = geo.nearest(c)
        reach = 1.4 * r  # satellites at 0.8 r with radius 0.6 r
        if idx is None or placement.lung[idx] != label or placement.depth[idx] < min_depth + reach:
            continue
        if c[2] - reach < z_upper or placement.site_ok(c, r, inside=1.0) is None:
            continue
        sat = rng.normal(size=(2, 3))
        sat /= np.linalg.norm(sat, axis=1, keepdims=True)
        return [(c, r)] + [(c + s * 0.8 * r, 0.6 * r) for s in sat]
    return []


def place_cle(
    rng: np.random.Generator,
    placement: Placement,
    clusters_per_lung: int,
    min_depth: float,
) -> list[dict[str, Any]]:
    """Clusters of 6-10 lucency blobs (radius 1.5-5 mm, two satellites each) in each lung's upper third, every blob
    at least ``min_depth`` mm from the lung surface (satellites included)."""
    geo, regions, spread = placement.geo, [], _CLE_SPREAD_MM
    for label, (z0, z1) in placement.heights.items():
        z_upper = _upper_third(z0, z1)
        cand = np.argwhere(
            (placement.lung == label) & (placement.depth >= min_depth + spread) & (placement.zw >= z_upper + spread)
        )
        placed, tries = 0, 0
        while placed < clusters_per_lung and len(cand) and tries < 60:
            tries += 1
            centre = geo.world(cand[rng.integers(len(cand))] + rng.uniform(-0.5, 0.5, 3))
            if not placement.free(centre, spread, 10.0):
                continue
            blobs: list[tuple[np.ndarray, float]] = []
            for _ in range(int(rng.integers(6, 11))):
                blobs += _cle_blob(rng, placement, centre, label, z_upper, min_depth)
            if len(blobs) < 9:  # fewer than three main blobs: not a cluster
                continue
            regions.append({"label": CLE, "lung": label, "balls": blobs})
            placement.balls.append((centre, spread + 5.0))
            placed += 1
    return regions


def _inward_normal(placement: Placement, idx: np.ndarray, radius_mm: float = 8.0) -> np.ndarray:
    """Unit vector from a surface voxel toward the Gaussian-weighted centre of the lung around it (world)."""
    geo = placement.geo
    centre = geo.world(idx[None])[0]
    box = geo.box(centre, radius_mm)
    x, y, z = geo.offsets(box, centre)
    w = np.exp(-(x**2 + y**2 + z**2) / (2 * (radius_mm / 2) ** 2)) * (placement.lung[box] > 0)
    n = np.array([(w * x).sum(), (w * y).sum(), (w * z).sum()])
    return n / (np.linalg.norm(n) + 1e-9)


def _in_plane_surface(placement: Placement) -> np.ndarray:
    """Lung surface voxels with lung on both sides along the slice axis (a quick pre-filter: the surface faces
    in-plane)."""
    lung = placement.lung > 0
    surface = lung & ~ndi.binary_erosion(lung, border_value=0)
    for step in (1, -1):
        surface &= np.roll(lung, step, axis=placement.geo.slice_axis)
    return surface


def _pse_cyst(
    rng: np.random.Generator, placement: Placement, idx: np.ndarray, z_upper: float
) -> Optional[tuple[np.ndarray, float]]:
    """A cyst (centre, outer radius) at the surface voxel ``idx``, or None where the site does not suit."""
    geo = placement.geo
    n = _inward_normal(placement, idx)
    if abs(float(n @ geo.dirs[:, geo.slice_axis])) > 0.5:
        return None
    r = float(rng.uniform(3.0, 7.0))
    half_voxel = 0.5 * float(np.sum(np.abs(n @ geo.dirs) * geo.spacing))
    c = geo.world(idx[None])[0] + n * (r - half_voxel)
    if c[2] - r < z_upper or not placement.free(c, r, 3.0):
        return None
    if placement.site_ok(c, r, inside=0.85) is None:
        return None
    return c, r


def place_pse(
    rng: np.random.Generator,
    placement: Placement,
    cysts_per_lung: int,
) -> list[dict[str, Any]]:
    """Subpleural cysts (outer radius 3-7 mm) along each lung's upper-third pleura, one layer, not overlapping: the
    centre lies radius minus half a voxel inside the surface along the inward normal. Surfaces facing along the slice
    axis (apex roof, diaphragm) are skipped: thick slices locate them only to half a slice."""
    regions = []
    surface = _in_plane_surface(placement)
    for label, (z0, z1) in placement.heights.items():
        z_upper = _upper_third(z0, z1)
        cand = np.argwhere(surface & (placement.lung == label) & (placement.zw >= z_upper + 3.0))
        placed = 0
        for k in rng.permutation(len(cand))[:400]:
            if placed >= cysts_per_lung:
                break
            cyst = _pse_cyst(rng, placement, cand[k], z_upper)
            if cyst is None:
                continue
            regions.append({"label": PSE, "lung": label, "balls": [cyst]})
            placement.balls.append(cyst)
            placed += 1
    return regions


def _ple_region(
    rng: np.random.Generator, geo: ScanGeometry, lower: np.ndarray, centre: np.ndarray, n_target: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n_target`` voxels of ``lower`` nearest ``centre`` (height counted 1.6 times, the distance perturbed by
    smooth noise), their largest connected part: (lowest index, highest index + 1, region in that box)."""
    from drasclr_ext.data.phantom.grid import smooth_field

    nz = np.argwhere(lower)
    lo, hi = nz.min(0), nz.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    x, y, z = geo.offsets(box, centre)
    score = np.sqrt(x**2 + y**2 + (1.6 * z) ** 2).astype(np.float32)  # flatter than tall: less cut by the third
    score += 8.0 * smooth_field(rng, score.shape, geo.spacing, 25.0)
    score[~lower[box]] = np.inf
    thr = np.partition(score.ravel(), n_target - 1)[n_target - 1]
    region = score <= thr
    comp, n_comp = ndi.label(region)
    if n_comp > 1:
        region = comp == (int(np.argmax(np.bincount(comp.ravel())[1:])) + 1)
    return lo, hi, region


def _blurred_edge(
    geo: ScanGeometry, region: np.ndarray, lo: np.ndarray, hi: np.ndarray, own: np.ndarray, edge_mm: float
) -> tuple[tuple[slice, ...], np.ndarray]:
    """The region's weight with its edge blurred over ``edge_mm`` inside its own lung, and the (padded) box of it."""
    sigma = edge_mm / geo.spacing
    pad = np.ceil(3 * sigma).astype(int) + 1
    lo2, hi2 = np.maximum(lo - pad, 0), np.minimum(hi + pad, np.array(geo.shape))
    big = tuple(slice(a, b) for a, b in zip(lo2, hi2))
    full = np.zeros(tuple(b - a for a, b in zip(lo2, hi2)), dtype=np.float32)
    full[tuple(slice(a - b, c - b) for a, b, c in zip(lo, lo2, hi))] = region
    w = ndi.gaussian_filter(full, sigma) * own[big]
    w[w < 0.02] = 0.0
    return big, w


def place_ple(
    rng: np.random.Generator,
    placement: Placement,
    fraction: tuple[float, float],
    edge_mm: float,
) -> Optional[dict[str, Any]]:
    """A smooth region in the lower third of one lung (``fraction`` of that lung's volume): the voxels nearest a
    deep centre in the lowest fifth (:func:`_ple_region`); edge blurred over ``edge_mm``."""
    geo = placement.geo
    labels = sorted(placement.heights)
    if not labels:
        return None
    label = int(labels[int(rng.integers(len(labels)))])
    z0, z1 = placement.heights[label]
    own = placement.lung == label
    lower = own & (placement.zw <= z0 + (z1 - z0) / 3.0 - 3.0)
    n_target = int(round(float(rng.uniform(*fraction)) * np.count_nonzero(own)))
    n_target = min(n_target, int(0.8 * np.count_nonzero(lower)))
    if n_target < 10:
        return None
    deep = lower & (placement.depth >= 15.0) & (placement.zw <= z0 + (z1 - z0) / 5.0)
    pool = np.argwhere(deep if deep.any() else lower)
    centre = geo.world(pool[rng.integers(len(pool))])
    lo, hi, region = _ple_region(rng, geo, lower, centre, n_target)
    big, w = _blurred_edge(geo, region, lo, hi, own, edge_mm)
    pts = geo.world(np.argwhere(region) + lo)
    mid = pts.mean(0)
    return {
        "label": PLE,
        "lung": label,
        "box": big,
        "weight": w,
        "centre": mid,
        "radius": float(np.linalg.norm(pts - mid, axis=1).max()),
        "extent_mm": (pts.max(0) - pts.min(0)).tolist(),
        "lung_fraction": float(len(pts)) / float(np.count_nonzero(own)),
    }
