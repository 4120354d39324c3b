"""Emphysema of the phantoms: panlobular regions, centrilobular lucencies and paraseptal cysts."""

from __future__ import annotations

import numpy as np

from drasclr_ext.data.phantom.grid import (
    Grid,
    coarse_noise,
    lookup,
    noise_at,
    paint_capsules,
    sample_points,
    smooth_field,
)


def cle_lesions(rng, lung, ple, grid, depth, step, rel_h, target, lung_ml):
    """Centres (mm) and radii of centrilobular lucency blobs: deep in the lung, upper zones, clustered."""
    r_max = 3.0 + 12.0 * min(target, 0.35)
    mean_vol = 4.0 / 3.0 * np.pi * np.mean(np.linspace(1.5, r_max, 50) ** 3) * 1.35 / 1000.0  # ml
    n = int(np.ceil(target * lung_ml / mean_vol * 1.25))
    cand = sample_points(rng, lung & ~ple, grid, 8 * n + 64)
    idx = grid.to_index(cand)
    ok = lookup(depth, step, idx) > 7.0
    cand, idx = cand[ok], idx[ok]
    hz = rel_h[tuple(np.clip(np.round(idx).astype(int), 0, np.array(lung.shape) - 1).T)]
    weight = (0.15 + hz**2.5) * np.exp(1.3 * noise_at(coarse_noise(rng, lung.shape, grid.spacing, 35.0), idx))
    n = min(n, len(cand))
    if n == 0:
        return np.zeros((0, 3)), np.zeros(0)
    pick = rng.choice(len(cand), size=n, replace=False, p=weight / weight.sum())
    centres = cand[pick]
    radii = rng.uniform(1.5, r_max, n)
    # two satellite blobs make each lucency irregular
    sat_dir = rng.normal(size=(2 * n, 3))
    sat_dir /= np.linalg.norm(sat_dir, axis=1, keepdims=True)
    sat_c = np.repeat(centres, 2, 0) + sat_dir * 0.8 * np.repeat(radii, 2)[:, None]
    return np.concatenate([centres, sat_c]), np.concatenate([radii, 0.6 * np.repeat(radii, 2)])


def pse_cysts(rng, lung, grid, depth, step, rel_h, target, lung_ml):
    """Centres (mm) and radii of subpleural cysts in a single layer (touching the pleura, not overlapping)."""
    coarse_lung = depth > 0
    surface = coarse_lung & (depth <= np.max(grid.spacing * step) * 1.01)
    sidx = np.argwhere(surface)
    if len(sidx) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    fine = sidx * step
    hz = rel_h[tuple(np.clip(fine, 0, np.array(lung.shape) - 1).T)]
    patches = noise_at(coarse_noise(rng, lung.shape, grid.spacing, 45.0), fine.astype(float))
    weight = (0.05 + np.clip(hz - 0.35, 0, None) ** 2) * np.exp(1.5 * patches)
    r_lo, r_hi = 3.0, 5.0 + 30.0 * min(target, 0.08)
    mean_vol = 4.0 / 3.0 * np.pi * np.mean(np.linspace(r_lo, r_hi, 50) ** 3) / 1000.0
    n_goal = int(np.ceil(target * lung_ml / mean_vol * 1.1))
    order = rng.choice(len(sidx), size=min(len(sidx), 6 * n_goal + 32), replace=False, p=weight / weight.sum())
    gz, gy, gx = np.gradient(depth)[::-1]  # inward normal = gradient of the depth
    centres, radii = [], []
    for k in order:
        if len(centres) >= n_goal:
            break
        c = tuple(sidx[k])
        g = np.array([gx[c], gy[c], gz[c]]) / (grid.spacing * step)
        if not np.all(np.isfinite(g)) or np.linalg.norm(g) < 1e-6:
            continue
        g /= np.linalg.norm(g)
        r = float(rng.uniform(r_lo, r_hi))
        centre = grid.to_mm(sidx[k] * step.astype(float)) + g * (r - 0.5 * float(np.min(grid.spacing * step)))
        if centres:
            dist = np.linalg.norm(np.array(centres) - centre, axis=1)
            if np.any(dist < 0.85 * (np.array(radii) + r)):
                continue
        centres.append(centre)
        radii.append(r)
    return np.array(centres).reshape(-1, 3), np.array(radii)


def draw_emphysema(
    rng: np.random.Generator,
    grid: Grid,
    lung: np.ndarray,
    rel_h: np.ndarray,
    depth: np.ndarray,
    step: np.ndarray,
    targets: dict[str, float],
    lung_ml: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The emphysema of one subject at its ``targets`` (fractions of the lung volume): the panlobular region (bool)
    and the partial-volume fractions of centrilobular lucencies, paraseptal cysts (outer) and their lumen."""
    shp, sp = grid.shape, grid.spacing
    # panlobular: diffuse lower-zone regions chosen by a smooth score, sized exactly to the target fraction
    ple = np.zeros(shp, dtype=bool)
    if targets["panlobular"] > 0:
        score = smooth_field(rng, shp, sp, 30.0) + 3.0 * (1.0 - rel_h)
        thr = np.quantile(score[lung], 1.0 - targets["panlobular"])
        ple = lung & (score > thr)
        del score
    cle = np.zeros(shp, dtype=np.float32)
    achieved = 0.0
    for _ in range(4):  # lucencies overlap: add more until the target fraction is (nearly) reached
        deficit = targets["centrilobular"] - achieved
        if deficit <= 0.1 * targets["centrilobular"] or deficit <= 0:
            break
        c, r = cle_lesions(rng, lung, ple, grid, depth, step, rel_h, deficit, lung_ml)
        paint_capsules(cle, grid, c, c, r)
        achieved = float(np.count_nonzero((cle >= 0.5) & lung & ~ple)) / max(int(lung.sum()), 1)
    pse_outer = np.zeros(shp, dtype=np.float32)
    pse_lumen = np.zeros(shp, dtype=np.float32)
    if targets["paraseptal"] > 0:
        c, r = pse_cysts(rng, lung, grid, depth, step, rel_h, targets["paraseptal"], lung_ml)
        wall = 0.5
        paint_capsules(pse_outer, grid, c, c, r)
        paint_capsules(pse_lumen, grid, c, c, r - wall)
    return ple, cle, pse_outer, pse_lumen
