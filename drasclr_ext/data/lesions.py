"""Insert synthetic emphysema lesions of each subtype into a real chest CT, with an exact truth map.

The lesions follow the phantom generator (:mod:`drasclr_ext.data.phantom`): centrilobular (CLE) lucencies without
walls, deep in the upper zones; paraseptal (PSE) subpleural cysts with a thin wall in one layer along the upper-zone
pleura; panlobular (PLE) diffusely darker lower-zone lung with its small vessels pruned. Everything is computed in
world millimetres through the scan's affine (any orientation). Each voxel's lesion fraction is sampled at several
heights along the slice axis (a 1.5 mm lucency fills only part of a 5 mm slice), HU are blended by that fraction
and the scan's own lung noise is added back where HU were replaced. Only parenchyma is replaced: vessels and walls
(HU above about -600) and everything outside the lung mask keep their HU (except the pruned vessels of PLE), and
CLE/PSE sites over vessels, airways or existing lucencies are not used. The truth map marks lung voxels at least
half replaced by a lesion, as the phantom's ground truth does.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from scipy import ndimage as ndi

__all__ = ["SUBTYPE_NAMES", "insert_lesions", "lung_noise"]

CLE, PSE, PLE = 2, 3, 4
SUBTYPE_NAMES = {CLE: "centrilobular", PSE: "paraseptal", PLE: "panlobular"}
LUNG_NAMES = {1: "right", 2: "left"}
CLE_HU, PSE_LUMEN_HU, PSE_WALL_HU, PLE_HU = -992.0, -990.0, -250.0, -970.0
PSE_WALL_MM = 0.5
_VESSEL_LO, _VESSEL_HI = -700.0, -600.0  # parenchyma weight 1 below, 0 above (vessels, walls, dense lung)


class _Geometry:
    """Voxel <-> world (mm) of a scan; the slice axis (largest spacing) is sub-sampled for partial volumes."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, ...]) -> None:
        self.affine = np.asarray(affine, dtype=np.float64)
        self.lin = self.affine[:3, :3]
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.linalg.norm(self.lin, axis=0)
        self.dirs = self.lin / self.spacing  # unit world direction of each voxel axis
        self.inv_lin = np.linalg.inv(self.lin)
        self.inv_row = np.linalg.norm(self.inv_lin, axis=1)  # voxels per mm along each axis (any direction)
        self.slice_axis = int(np.argmax(self.spacing))
        in_plane = float(np.min(np.delete(self.spacing, self.slice_axis)))
        self.n_sub = max(1, int(round(self.spacing[self.slice_axis] / in_plane)))
        self.sub_offsets = (np.arange(self.n_sub) + 0.5) / self.n_sub - 0.5  # voxel units along the slice axis
        self.h = float(np.cbrt(np.prod(self.spacing) / self.n_sub))  # partial-volume ramp width (mm)

    def world(self, ijk: np.ndarray) -> np.ndarray:
        return np.asarray(ijk, dtype=np.float64) @ self.lin.T + self.affine[:3, 3]

    def index(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.affine[:3, 3]) @ self.inv_lin.T

    def nearest(self, point: np.ndarray) -> Optional[tuple[int, int, int]]:
        idx = np.round(self.index(point[None])[0]).astype(int)
        if np.any(idx < 0) or np.any(idx >= np.array(self.shape)):
            return None
        return int(idx[0]), int(idx[1]), int(idx[2])

    def box(self, centre: np.ndarray, radius_mm: float) -> Optional[tuple[slice, slice, slice]]:
        """Index box holding the ball of ``radius_mm`` around ``centre`` (clipped to the scan), None if outside."""
        c = self.index(centre[None])[0]
        ext = radius_mm * self.inv_row + 1.0
        lo = np.maximum(np.floor(c - ext).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, np.array(self.shape))
        if np.any(hi <= lo):
            return None
        return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])

    def offsets(self, box: tuple[slice, slice, slice], centre: np.ndarray, shift: float = 0.0) -> list[np.ndarray]:
        """World offsets (x, y, z arrays broadcasting to the box) of the box's voxels from ``centre``, the voxels
        moved by ``shift`` voxels along the slice axis."""
        ax = [np.arange(b.start, b.stop, dtype=np.float64) for b in box]
        ax[self.slice_axis] = ax[self.slice_axis] + shift
        out = []
        for w in range(3):
            comp = self.affine[w, 3] - centre[w]
            for d in range(3):
                shape = [1, 1, 1]
                shape[d] = -1
                comp = comp + (self.lin[w, d] * ax[d]).reshape(shape)
            out.append(comp)
        return out

    def ball_fraction(self, centre: np.ndarray, radius: float) -> Optional[tuple[tuple[slice, ...], np.ndarray]]:
        """Share of each voxel's slab inside the ball (slice axis sub-sampled), in the ball's index box."""
        box = self.box(centre, radius + self.h)
        if box is None:
            return None
        frac = np.zeros(tuple(b.stop - b.start for b in box), dtype=np.float32)
        for dz in self.sub_offsets:
            x, y, z = self.offsets(box, centre, dz)
            dist = np.sqrt(x**2 + y**2 + z**2)
            frac += np.clip((radius - dist) / self.h + 0.5, 0.0, 1.0).astype(np.float32)
        return box, frac / np.float32(self.n_sub)

    def footprint(self, radius_mm: float) -> np.ndarray:
        """Voxel offsets within ``radius_mm`` (world distance), as a boolean structuring element."""
        ext = np.floor(radius_mm / self.spacing + 1e-6).astype(int)
        grids = np.meshgrid(*[np.arange(-e, e + 1) for e in ext], indexing="ij")
        d = np.stack(grids, -1) @ self.lin.T
        return np.linalg.norm(d, axis=-1) <= radius_mm + 1e-6

    def world_z(self) -> np.ndarray:
        """Superior (RAS z) coordinate of every voxel centre, float32."""
        i, j, k = (np.arange(n, dtype=np.float32) for n in self.shape)
        a = self.affine.astype(np.float32)
        return a[2, 0] * i[:, None, None] + a[2, 1] * j[None, :, None] + a[2, 2] * k[None, None, :] + a[2, 3]


def _depth_mm(lung: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of each lung voxel to the nearest non-lung voxel (the scan's edge counts as outside)."""
    depth = np.zeros(lung.shape, dtype=np.float32)
    nz = np.argwhere(lung)
    if len(nz) == 0:
        return depth
    lo, hi = nz.min(0), nz.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    padded = np.pad(lung[box], 1)
    depth[box] = ndi.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return depth


def _parenchyma_weight(hu: np.ndarray) -> np.ndarray:
    """1 for parenchyma (HU <= -700), 0 for vessels, walls and dense lung (HU >= -600), linear between."""
    return np.clip((_VESSEL_HI - hu) / (_VESSEL_HI - _VESSEL_LO), 0.0, 1.0).astype(np.float32)


def _high_pass(x: np.ndarray, slice_axis: int) -> np.ndarray:
    sigma = [2.0, 2.0, 2.0]
    sigma[slice_axis] = 0.0
    return x - ndi.gaussian_filter(x, sigma)


def _lag1(r: np.ndarray, valid: np.ndarray, axes: list[int]) -> float:
    """Mean correlation of ``r`` between neighbours along ``axes`` where both are valid."""
    rhos = []
    for a in axes:
        n = r.shape[a]
        first = [slice(None)] * r.ndim
        second = [slice(None)] * r.ndim
        first[a], second[a] = slice(0, n - 1), slice(1, n)
        both = valid[tuple(first)] & valid[tuple(second)]
        if np.count_nonzero(both) > 10:
            rhos.append(float(np.corrcoef(r[tuple(first)][both], r[tuple(second)][both])[0, 1]))
    return float(np.mean(rhos)) if rhos else 0.0


def lung_noise(hu: np.ndarray, lung: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    """Noise standard deviation (HU) and in-plane correlation width (Gaussian sigma, voxels) of the scan's lung.

    Measured on the in-plane high-pass residual of vessel-free parenchyma (-950..-700 HU, nothing above -600 HU
    within two voxels), then matched by filtered white noise through the same high-pass (same residual standard
    deviation and neighbour correlation). Falls back to (25 HU, 0.7) when the lung holds too little parenchyma.
    """
    geo = _Geometry(affine, hu.shape)
    nz = np.argwhere(lung > 0)
    if len(nz) == 0:
        return 25.0, 0.7
    box = tuple(slice(a, b) for a, b in zip(nz.min(0), nz.max(0) + 1))
    h = np.asarray(hu[box], dtype=np.float32)
    size = [5, 5, 5]
    size[geo.slice_axis] = 1
    clean = (h > -950) & (h < -700) & (ndi.maximum_filter(h, size) < -600)
    clean &= ndi.minimum_filter((lung[box] > 0).astype(np.uint8), size) > 0
    if np.count_nonzero(clean) < 1000:
        return 25.0, 0.7
    in_plane = [a for a in range(3) if a != geo.slice_axis]
    r = _high_pass(h, geo.slice_axis)
    sigma_r = 1.4826 * float(np.median(np.abs(r[clean] - np.median(r[clean]))))
    rho = _lag1(r, clean, in_plane)
    rng = np.random.default_rng(0)
    white = rng.standard_normal((256, 256, 1)).astype(np.float32)
    best = (np.inf, 0.0, 1.0)
    for width in np.arange(0.0, 2.01, 0.1):
        n = ndi.gaussian_filter(white, (width, width, 0.0)) if width > 0 else white
        n = n / n.std()
        rs = _high_pass(n, 2)
        err = abs(_lag1(rs, np.ones(rs.shape, bool), [0, 1]) - rho)
        if err < best[0]:
            best = (err, float(width), float(rs.std()))
    return sigma_r / best[2], best[1]


def _noise_field(rng: np.random.Generator, shape: tuple[int, ...], slice_axis: int, width: float) -> np.ndarray:
    """Unit-variance Gaussian noise correlated in-plane (Gaussian sigma ``width`` voxels), independent per slice."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if width > 0:
        sigma = [width, width, width]
        sigma[slice_axis] = 0.0
        n = ndi.gaussian_filter(n, sigma)
    return n / np.float32(n.std() + 1e-6)


class _Painter:
    """The scan, its lung and depth while lesions are placed: checks candidate sites and keeps placed ones apart."""

    def __init__(self, geo: _Geometry, hu: np.ndarray, lung: np.ndarray, depth: np.ndarray) -> None:
        self.geo, self.hu, self.lung, self.depth = geo, hu, lung, depth
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
        if float((frac * _parenchyma_weight(hu)).sum()) / total < 0.85:
            return None
        if float((frac * hu).sum()) / total < -930.0:
            return None
        return bf


def _lung_heights(lung: np.ndarray, zw: np.ndarray) -> dict[int, tuple[float, float]]:
    """World z (mm) of each lung's lowest and highest voxel centre."""
    out = {}
    for label in (int(v) for v in np.unique(lung) if v != 0):
        z = zw[lung == label]
        out[label] = (float(z.min()), float(z.max()))
    return out


def _ball_in_ball(rng: np.random.Generator, radius: float) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v) * radius * float(rng.uniform()) ** (1.0 / 3.0)


def _place_cle(
    rng: np.random.Generator,
    painter: _Painter,
    heights: dict[int, tuple[float, float]],
    zw: np.ndarray,
    clusters_per_lung: int,
    min_depth: float,
) -> list[dict[str, Any]]:
    """Clusters of 6-10 lucency blobs (radius 1.5-5 mm, two satellites each) in each lung's upper third, every blob
    at least ``min_depth`` mm from the lung surface (satellites included)."""
    geo, regions = painter.geo, []
    spread = 8.0
    for label, (z0, z1) in heights.items():
        z_upper = z0 + (z1 - z0) * 2.0 / 3.0
        cand = np.argwhere((painter.lung == label) & (painter.depth >= min_depth + spread) & (zw >= z_upper + spread))
        placed, tries = 0, 0
        while placed < clusters_per_lung and len(cand) and tries < 60:
            tries += 1
            centre = geo.world(cand[rng.integers(len(cand))] + rng.uniform(-0.5, 0.5, 3))
            if not painter.free(centre, spread, 10.0):
                continue
            blobs: list[tuple[np.ndarray, float]] = []
            for _ in range(int(rng.integers(6, 11))):
                for _attempt in range(15):
                    r = float(rng.uniform(1.5, 5.0))
                    c = centre + _ball_in_ball(rng, spread)
                    idx = geo.nearest(c)
                    reach = 1.4 * r  # satellites at 0.8 r with radius 0.6 r
                    if idx is None or painter.lung[idx] != label or painter.depth[idx] < min_depth + reach:
                        continue
                    if c[2] - reach < z_upper or painter.site_ok(c, r, inside=1.0) is None:
                        continue
                    blobs.append((c, r))
                    sat = rng.normal(size=(2, 3))
                    sat /= np.linalg.norm(sat, axis=1, keepdims=True)
                    blobs += [(c + s * 0.8 * r, 0.6 * r) for s in sat]
                    break
            if len(blobs) < 9:  # fewer than three main blobs: not a cluster
                continue
            regions.append({"label": CLE, "lung": label, "balls": blobs})
            painter.balls.append((centre, spread + 5.0))
            placed += 1
    return regions


def _inward_normal(painter: _Painter, idx: np.ndarray, radius_mm: float = 8.0) -> np.ndarray:
    """Unit vector from a surface voxel toward the Gaussian-weighted centre of the lung around it (world)."""
    geo = painter.geo
    centre = geo.world(idx[None])[0]
    box = geo.box(centre, radius_mm)
    x, y, z = geo.offsets(box, centre)
    w = np.exp(-(x**2 + y**2 + z**2) / (2 * (radius_mm / 2) ** 2)) * (painter.lung[box] > 0)
    n = np.array([(w * x).sum(), (w * y).sum(), (w * z).sum()])
    return n / (np.linalg.norm(n) + 1e-9)


def _place_pse(
    rng: np.random.Generator,
    painter: _Painter,
    heights: dict[int, tuple[float, float]],
    zw: np.ndarray,
    cysts_per_lung: int,
) -> list[dict[str, Any]]:
    """Subpleural cysts (outer radius 3-7 mm) along each lung's upper-third pleura, one layer, not overlapping: the
    centre lies radius minus half a voxel inside the surface along the inward normal. Surfaces facing along the slice
    axis (apex roof, diaphragm) are skipped: thick slices locate them only to half a slice."""
    geo, regions = painter.geo, []
    lung = painter.lung > 0
    surface = lung & ~ndi.binary_erosion(lung, border_value=0)
    # quick pre-filter: lung on both sides along the slice axis (the surface faces in-plane)
    for step in (1, -1):
        surface &= np.roll(lung, step, axis=geo.slice_axis)
    slice_dir = geo.dirs[:, geo.slice_axis]
    for label, (z0, z1) in heights.items():
        z_upper = z0 + (z1 - z0) * 2.0 / 3.0
        cand = np.argwhere(surface & (painter.lung == label) & (zw >= z_upper + 3.0))
        order = rng.permutation(len(cand))[:400]
        placed = 0
        for k in order:
            if placed >= cysts_per_lung:
                break
            n = _inward_normal(painter, cand[k])
            if abs(float(n @ slice_dir)) > 0.5:
                continue
            r = float(rng.uniform(3.0, 7.0))
            half_voxel = 0.5 * float(np.sum(np.abs(n @ geo.dirs) * geo.spacing))
            c = geo.world(cand[k][None])[0] + n * (r - half_voxel)
            if c[2] - r < z_upper or not painter.free(c, r, 3.0):
                continue
            if painter.site_ok(c, r, inside=0.85) is None:
                continue
            regions.append({"label": PSE, "lung": label, "balls": [(c, r)]})
            painter.balls.append((c, r))
            placed += 1
    return regions


def _place_ple(
    rng: np.random.Generator,
    painter: _Painter,
    heights: dict[int, tuple[float, float]],
    zw: np.ndarray,
    fraction: tuple[float, float],
    edge_mm: float,
) -> Optional[dict[str, Any]]:
    """A smooth region in the lower third of one lung (``fraction`` of that lung's volume): the voxels nearest a
    deep centre in the lowest fifth (height counted 1.6 times), the distance perturbed by smooth noise; its largest
    connected part; edge blurred over ``edge_mm``."""
    from drasclr_ext.data.phantom.grid import smooth_field

    geo = painter.geo
    labels = sorted(heights)
    if not labels:
        return None
    label = int(labels[int(rng.integers(len(labels)))])
    z0, z1 = heights[label]
    own = painter.lung == label
    lower = own & (zw <= z0 + (z1 - z0) / 3.0 - 3.0)
    n_target = int(round(float(rng.uniform(*fraction)) * np.count_nonzero(own)))
    n_target = min(n_target, int(0.8 * np.count_nonzero(lower)))
    if n_target < 10:
        return None
    deep = lower & (painter.depth >= 15.0) & (zw <= z0 + (z1 - z0) / 5.0)
    pool = np.argwhere(deep if deep.any() else lower)
    centre = geo.world(pool[rng.integers(len(pool))])
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
    sigma = edge_mm / geo.spacing
    pad = np.ceil(3 * sigma).astype(int) + 1
    lo2, hi2 = np.maximum(lo - pad, 0), np.minimum(hi + pad, np.array(geo.shape))
    big = tuple(slice(a, b) for a, b in zip(lo2, hi2))
    full = np.zeros(tuple(b - a for a, b in zip(lo2, hi2)), dtype=np.float32)
    full[tuple(slice(a - b, c - b) for a, b, c in zip(lo, lo2, hi))] = region
    w = ndi.gaussian_filter(full, sigma) * own[big]
    w[w < 0.02] = 0.0
    ijk = np.argwhere(region) + lo
    pts = geo.world(ijk)
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


def insert_lesions(
    hu: np.ndarray,
    affine: np.ndarray,
    lung_mask: np.ndarray,
    seed: int = 0,
    *,
    cle_clusters_per_lung: int = 2,
    cle_min_depth_mm: float = 10.0,
    pse_cysts_per_lung: int = 3,
    ple_fraction: tuple[float, float] = (0.05, 0.10),
    ple_edge_mm: float = 1.5,
    ple_prune_radius_mm: float = 1.5,
    noise: Optional[tuple[float, float]] = None,
) -> dict[str, Any]:
    """Insert CLE, PSE and PLE lesions into a CT (deterministic per ``seed``).

    Args:
        hu: CT in HU, (X, Y, Z).
        affine: its 4x4 voxel-to-world (RAS, mm) matrix; any orientation.
        lung_mask: lung labels on the same grid (1 right, 2 left; any nonzero label is a lung).
        seed: every random choice derives from it.
        cle_clusters_per_lung: CLE clusters per lung (6-10 blobs of radius 1.5-5 mm, -992 HU, within 8 mm).
        cle_min_depth_mm: least distance of every CLE blob to the lung surface.
        pse_cysts_per_lung: PSE cysts per lung (outer radius 3-7 mm, 0.5 mm wall of -250 HU, -990 HU lumen).
        ple_fraction: range of the PLE region's share of its lung (drawn uniformly).
        ple_edge_mm: Gaussian sigma of the PLE region's blended edge.
        ple_prune_radius_mm: vessels thinner than this (radius) vanish in PLE (grey opening); larger ones lose a voxel
            of radius (grey erosion).
        noise: (HU standard deviation, in-plane correlation width in voxels) of the noise added where HU were replaced;
            default measured on the scan's lung by :func:`lung_noise`.

    Returns:
        dict with ``image`` (float32 HU, whole numbers, same shape), ``truth`` (uint8: 0 untouched or outside the
        lung, 2 CLE, 3 PSE, 4 PLE: lung voxels at least half replaced by the lesion), ``region_map`` (uint16: i + 1
        on the truth voxels of ``regions[i]``), ``changed`` (bool: voxels whose HU may differ), ``regions`` (list of
        dicts: ``subtype``, ``label``, ``lung``, ``centre_mm``, ``radius_mm`` (a ball around the centre holding the
        region), ``voxels`` (truth voxels), for CLE/PSE ``balls_mm`` (x, y, z, outer radius of every painted ball; CLE:
        each blob then its two satellites) and ``blobs``/``wall_mm``, for PLE ``extent_mm``/``lung_fraction``) and
        ``noise``.
    """
    hu = np.asarray(hu, dtype=np.float32)
    lung = np.asarray(lung_mask).astype(np.uint8)
    if hu.shape != lung.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and lung_mask {lung.shape} must be the same 3D shape")
    affine = np.asarray(affine, dtype=np.float64)
    result = {
        "image": hu.copy(),
        "truth": np.zeros(hu.shape, np.uint8),
        "region_map": np.zeros(hu.shape, np.uint16),
        "changed": np.zeros(hu.shape, bool),
        "regions": [],
        "noise": {},
    }
    nz = np.argwhere(lung > 0)
    if len(nz) == 0:
        return result
    # work on the lungs' bounding box (plus 3 voxels), in the box's own affine: everything else stays as it was
    lo, hi = np.maximum(nz.min(0) - 3, 0), np.minimum(nz.max(0) + 4, np.array(hu.shape))
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    inner = _insert(
        hu[box],
        affine @ shift,
        lung[box],
        seed,
        cle_clusters_per_lung,
        cle_min_depth_mm,
        pse_cysts_per_lung,
        ple_fraction,
        ple_edge_mm,
        ple_prune_radius_mm,
        noise,
    )
    for key in ("image", "truth", "region_map", "changed"):
        result[key][box] = inner[key]
    result["regions"], result["noise"] = inner["regions"], inner["noise"]
    return result


def _insert(
    hu: np.ndarray,
    affine: np.ndarray,
    lung: np.ndarray,
    seed: int,
    cle_clusters_per_lung: int,
    cle_min_depth_mm: float,
    pse_cysts_per_lung: int,
    ple_fraction: tuple[float, float],
    ple_edge_mm: float,
    ple_prune_radius_mm: float,
    noise: Optional[tuple[float, float]],
) -> dict[str, Any]:
    """:func:`insert_lesions` on a box around the lungs (``affine`` is the box's)."""
    geo = _Geometry(affine, hu.shape)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 0x1E5]).spawn(4)]
    if noise is None:
        noise = lung_noise(hu, lung, geo.affine)
    depth = _depth_mm(lung > 0, geo.spacing)
    zw = geo.world_z()
    heights = _lung_heights(lung, zw)
    painter = _Painter(geo, hu, lung, depth)
    cle = _place_cle(rngs[0], painter, heights, zw, cle_clusters_per_lung, cle_min_depth_mm)
    pse = _place_pse(rngs[1], painter, heights, zw, pse_cysts_per_lung)
    ple = _place_ple(rngs[2], painter, heights, zw, ple_fraction, ple_edge_mm)

    out = hu.copy()
    weight = np.zeros(hu.shape, dtype=np.float32)  # share of each voxel's HU replaced (for the noise)
    truth = np.zeros(hu.shape, dtype=np.uint8)
    region_map = np.zeros(hu.shape, dtype=np.uint16)
    in_lung = lung > 0
    regions: list[dict[str, Any]] = []

    def blend(box, a: np.ndarray, target) -> None:
        view = out[box]
        view += a * (np.float32(target) - view)
        np.maximum(weight[box], a, out=weight[box])

    for reg in cle + pse:
        rid = len(regions) + 1
        lumen_r = [r - PSE_WALL_MM if reg["label"] == PSE else r for _, r in reg["balls"]]
        lo = np.array(geo.shape)
        hi = np.zeros(3, dtype=int)
        pieces = []
        for (c, r), rl in zip(reg["balls"], lumen_r):
            bf = geo.ball_fraction(c, r)
            if bf is None:
                continue
            box, f = bf
            pieces.append((box, f, geo.ball_fraction(c, rl) if reg["label"] == PSE else bf))
            lo = np.minimum(lo, [b.start for b in box])
            hi = np.maximum(hi, [b.stop for b in box])
        if not pieces:
            continue
        rbox = tuple(slice(a, b) for a, b in zip(lo, hi))
        outer = np.zeros(tuple(hi - lo), dtype=np.float32)
        lumen = np.zeros_like(outer)
        for box, f, (lbox, fl) in pieces:
            sub = tuple(slice(b.start - a, b.stop - a) for b, a in zip(box, lo))
            np.maximum(outer[sub], f, out=outer[sub])
            lsub = tuple(slice(b.start - a, b.stop - a) for b, a in zip(lbox, lo))
            np.maximum(lumen[lsub], fl, out=lumen[lsub])
        p = _parenchyma_weight(hu[rbox]) * in_lung[rbox]
        if reg["label"] == PSE:  # (1 - outer) parenchyma + (outer - lumen) wall + lumen air, outer >= lumen
            blend(rbox, outer * p, PSE_WALL_HU)
            out[rbox] += lumen * p * np.float32(PSE_LUMEN_HU - PSE_WALL_HU)
        else:
            blend(rbox, lumen * p, CLE_HU)
        hit = (lumen >= 0.5) & (p >= 0.5)
        truth[rbox][hit] = reg["label"]
        region_map[rbox][hit] = rid
        balls = reg["balls"]
        centre = np.mean([c for c, _ in balls], axis=0)
        entry: dict[str, Any] = {
            "subtype": SUBTYPE_NAMES[reg["label"]],
            "label": reg["label"],
            "lung": LUNG_NAMES.get(reg["lung"], str(reg["lung"])),
            "centre_mm": [round(float(v), 2) for v in centre],
            "radius_mm": round(max(float(np.linalg.norm(c - centre)) + r for c, r in balls), 2),
            "voxels": int(np.count_nonzero(hit)),
        }
        if reg["label"] == CLE:
            entry["blobs"] = len(balls) // 3
        else:
            entry["wall_mm"] = PSE_WALL_MM
        entry["balls_mm"] = [[round(float(v), 2) for v in c] + [round(r, 2)] for c, r in balls]
        regions.append(entry)

    if ple is not None:
        box, w = ple["box"], ple["weight"]
        fp = geo.footprint(ple_prune_radius_mm)
        opened = ndi.grey_opening(hu[box], footprint=fp)
        eroded = ndi.grey_erosion(opened, footprint=geo.footprint(max(float(geo.spacing.min()), 1.0) * 1.01))
        keep = np.clip((eroded + 650.0) / 100.0, 0.0, 1.0)  # cores of the larger (narrowed) vessels
        a = (w * (1.0 - keep)).astype(np.float32)
        blend(box, a, PLE_HU)
        hit = (w >= 0.5) & (keep < 0.5) & in_lung[box]
        truth[box][hit] = PLE
        region_map[box][hit] = len(regions) + 1
        regions.append(
            {
                "subtype": SUBTYPE_NAMES[PLE],
                "label": PLE,
                "lung": LUNG_NAMES.get(ple["lung"], str(ple["lung"])),
                "centre_mm": [round(float(v), 2) for v in ple["centre"]],
                "radius_mm": round(ple["radius"], 2),
                "voxels": int(np.count_nonzero(hit)),
                "extent_mm": [round(float(v), 1) for v in ple["extent_mm"]],
                "lung_fraction": round(ple["lung_fraction"], 4),
            }
        )

    changed = weight > 0
    if changed.any():
        nz = np.argwhere(changed)
        box = tuple(slice(a, b) for a, b in zip(nz.min(0), nz.max(0) + 1))
        field = _noise_field(rngs[3], tuple(b.stop - b.start for b in box), geo.slice_axis, noise[1])
        a = weight[box]
        amp = np.float32(noise[0]) * np.sqrt(np.clip(1.0 - (1.0 - a) ** 2, 0.0, 1.0))
        noisy = np.clip(np.round(out[box] + amp * field), -1024.0, 3071.0)
        out[box] = np.where(changed[box], noisy, hu[box])
    return {
        "image": out,
        "truth": truth,
        "region_map": region_map,
        "changed": changed,
        "regions": regions,
        "noise": {"sigma_hu": round(float(noise[0]), 2), "width_voxels": round(float(noise[1]), 2)},
    }
