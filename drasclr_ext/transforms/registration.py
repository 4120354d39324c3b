"""Affine registration of a subject's lung mask to an atlas lung mask with ITK.

Fixed image = atlas mask, moving image = subject mask, both binarised and block-averaged onto a coarse grid (3 mm by
default) so the images are small and smooth; centre-of-mass initialisation (``itk.CenteredTransformInitializer``,
MOMENTS mode), an ``itk.AffineTransform``, a mean-squares metric on the mask fractions, regular-step gradient descent,
multi-resolution shrink factors 4, 2, 1 (12, 6 and 3 mm) with smoothing and random metric sampling.

Coordinates: :class:`RegistrationResult` holds ``atlas_to_subject``, a 4x4 matrix mapping atlas RAS WORLD (mm)
coordinates to subject RAS WORLD coordinates (MONAI's convention; ITK works in LPS internally and the conversion
``diag(-1, -1, 1)`` is done here), and its inverse ``subject_to_atlas``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from scipy import ndimage

from drasclr_ext.atlas import Atlas, load_atlas
from drasclr_ext.errors import RegistrationError
from drasclr_ext.fileio import atomic_write_json
from drasclr_ext.geometry import apply_affine, array_and_affine, memory_layout, voxel_spacing

__all__ = [
    "AtlasRegistration",
    "AtlasRegistrationd",
    "RegistrationResult",
    "block_average",
    "dice_in_atlas_space",
]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


@dataclass
class RegistrationResult:
    """The outcome of :class:`AtlasRegistration`.

    Attributes:
        atlas_to_subject: 4x4, atlas RAS world (mm) -> subject RAS world (mm).
        subject_to_atlas: its inverse.
        dice: Dice of the warped subject mask vs the atlas mask (on the registration grid).
        metric: final value of the ITK metric (mean squares of the mask fractions, lower is better).
        iterations: optimiser iterations of the last level.
        seconds: wall time of the registration.
        atlas_name: name of the atlas the subject was registered to.
        stop_condition: the optimiser's stop condition.
    """

    atlas_to_subject: np.ndarray
    subject_to_atlas: np.ndarray = field(default=None)  # type: ignore[assignment]
    dice: float = float("nan")
    metric: float = float("nan")
    iterations: int = 0
    seconds: float = 0.0
    atlas_name: str = ""
    stop_condition: str = ""

    def __post_init__(self) -> None:
        self.atlas_to_subject = np.asarray(self.atlas_to_subject, dtype=np.float64)
        if self.subject_to_atlas is None:
            self.subject_to_atlas = np.linalg.inv(self.atlas_to_subject)
        self.subject_to_atlas = np.asarray(self.subject_to_atlas, dtype=np.float64)

    def atlas_voxel_to_subject_world(self, atlas_affine: np.ndarray) -> np.ndarray:
        """4x4 mapping atlas voxel indices to subject RAS world coordinates."""
        return self.atlas_to_subject @ np.asarray(atlas_affine, dtype=np.float64)

    def map_atlas_voxels(self, atlas_affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
        """Subject world coordinates (..., 3) of atlas voxel coordinates (..., 3)."""
        return apply_affine(self.atlas_voxel_to_subject_world(atlas_affine), ijk)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["atlas_to_subject"] = self.atlas_to_subject.tolist()
        d["subject_to_atlas"] = self.subject_to_atlas.tolist()
        d["convention"] = "atlas_to_subject maps atlas RAS world mm to subject RAS world mm"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegistrationResult:
        keys = {"atlas_to_subject", "subject_to_atlas", "iterations", "atlas_name"}
        numbers = {k: float("nan") if d.get(k) is None else float(d[k]) for k in ("dice", "metric", "seconds")}
        return cls(**{k: d[k] for k in keys if k in d}, **numbers, stop_condition=str(d.get("stop_condition") or ""))

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write as JSON atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> RegistrationResult:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _block_sums(mask: np.ndarray, shape: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """uint16 sums of a C-ordered boolean (X, Y, Z) array over blocks of ``factors``, ``shape`` blocks per axis."""
    fx, fy, fz = factors
    # sum over blocks one axis at a time: keeps the temporaries small
    out = mask.reshape(shape[0], fx, -1).sum(1, dtype=np.uint16)
    out = out.reshape(shape[0], shape[1], fy, shape[2] * fz).sum(2, dtype=np.uint16)
    return out.reshape(shape[0], shape[1], shape[2], fz).sum(3, dtype=np.uint16)


def block_average(mask: np.ndarray, affine: np.ndarray, grid_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Lung fraction of ``mask`` on a coarser grid of about ``grid_mm`` (integer block factors per axis).

    Returns the float32 fraction image and its affine (voxel centres at the blocks' centres).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(affine)
    factors = np.maximum(1, np.round(grid_mm / spacing)).astype(int)
    shape = np.array(mask.shape) // factors
    if np.any(shape < 1):
        raise RegistrationError(f"lung mask of shape {mask.shape} is too small to register; check the scan")
    cropped = np.asarray(mask[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]) > 0
    if memory_layout(cropped) == "F":  # NIfTI order: sum the C-ordered transpose
        out = _block_sums(cropped.T, shape[::-1], factors[::-1]).T
    else:
        out = _block_sums(np.ascontiguousarray(cropped), shape, factors)
    fraction = out.astype(np.float32) / float(np.prod(factors))
    grid_affine = affine.copy()
    grid_affine[:3, :3] = affine[:3, :3] * factors
    grid_affine[:3, 3] = apply_affine(affine, (factors - 1) / 2.0)
    return fraction, grid_affine


@functools.cache
def _itk_classes(per_class: bool = True) -> SimpleNamespace:
    """The ITK classes the registration uses, from ITK's per-class wrapper modules where possible.

    ``itk.X`` loads, with X's module, every template of that module and of the modules it depends on (for the
    registration: ImageIntensity, Smoothing, Convolution, Thresholding...), about 10 s per process on the 2-core
    sandbox; importing the wrapper modules of the few classes used loads only the libraries they live in (2-4 s).
    An ITK whose wrappers are laid out differently (or ``per_class=False``) uses the ``itk`` namespace: the same
    classes, the same result.
    """
    try:
        if not per_class:
            raise ImportError("the itk namespace was asked for")
        from itk import (
            ITKCommonBasePython,
            itkAffineTransformPython,
            itkCenteredTransformInitializerPython,
            itkImageRegistrationMethodv4Python,
            itkMatrixPython,
            itkMeanSquaresImageToImageMetricv4Python,
            itkPyBufferPython,
            itkRegistrationParameterScalesFromPhysicalShiftPython,
            itkRegularStepGradientDescentOptimizerv4Python,
            itkVersorRigid3DTransformPython,
            vnl_matrix_fixedPython,
        )

        def matrix(array: np.ndarray) -> Any:
            vnl = vnl_matrix_fixedPython.vnl_matrix_fixedD_3_3()
            for (i, j), value in np.ndenumerate(array):
                vnl.put(i, j, float(value))
            return itkMatrixPython.itkMatrixD33(vnl)

        return SimpleNamespace(
            threads=ITKCommonBasePython.itkMultiThreaderBase,
            image_view=itkPyBufferPython.itkPyBufferIF3.GetImageViewFromArray,
            matrix=matrix,
            rigid=itkVersorRigid3DTransformPython.itkVersorRigid3DTransformD,
            initializer=itkCenteredTransformInitializerPython.itkCenteredTransformInitializerVR3DTDIF3IF3,
            affine=itkAffineTransformPython.itkAffineTransformD3,
            metric=itkMeanSquaresImageToImageMetricv4Python.itkMeanSquaresImageToImageMetricv4IF3IF3,
            scales=itkRegistrationParameterScalesFromPhysicalShiftPython.itkRegistrationParameterScalesFromPhysicalShiftMSITIMF3,
            optimizer=itkRegularStepGradientDescentOptimizerv4Python.itkRegularStepGradientDescentOptimizerv4D,
            method=itkImageRegistrationMethodv4Python.itkImageRegistrationMethodv4REGv4F3F3,
            sampling=itkImageRegistrationMethodv4Python.itkImageRegistrationMethodv4Enums,
        )
    except (ImportError, AttributeError):
        import itk

        image = itk.Image[itk.F, 3]
        metric = itk.MeanSquaresImageToImageMetricv4[image, image]
        return SimpleNamespace(
            threads=itk.MultiThreaderBase,
            image_view=itk.PyBuffer[image].GetImageViewFromArray,
            matrix=lambda array: itk.matrix_from_array(np.ascontiguousarray(array, dtype=np.float64)),
            rigid=itk.VersorRigid3DTransform[itk.D],
            initializer=itk.CenteredTransformInitializer[itk.VersorRigid3DTransform[itk.D], image, image],
            affine=itk.AffineTransform[itk.D, 3],
            metric=metric,
            scales=itk.RegistrationParameterScalesFromPhysicalShift[metric],
            optimizer=itk.RegularStepGradientDescentOptimizerv4[itk.D],
            method=itk.ImageRegistrationMethodv4[image, image],
            sampling=itk.itkImageRegistrationMethodv4Python.itkImageRegistrationMethodv4Enums,
        )


def _itk_image(array: np.ndarray, affine: np.ndarray):
    """An ``itk.Image[itk.F, 3]`` of an (X, Y, Z) array with a RAS affine (converted to ITK's LPS geometry).

    The image views a float32 copy of the array (ITK's x fastest: the array's Fortran order), which it keeps alive.
    """
    api = _itk_classes()
    image = api.image_view(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    spacing = voxel_spacing(lps)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection(api.matrix(lps[:3, :3] / spacing))
    return image


def dice_in_atlas_space(
    subject_mask: np.ndarray,
    subject_affine: np.ndarray,
    atlas_fraction: np.ndarray,
    atlas_grid_affine: np.ndarray,
    atlas_to_subject: np.ndarray,
) -> float:
    """Dice of the subject mask warped onto the atlas grid (nearest neighbour) vs the atlas mask (fraction >= 0.5)."""
    atlas_lung = atlas_fraction >= 0.5
    grid_to_subject_voxel = np.linalg.inv(subject_affine) @ atlas_to_subject @ atlas_grid_affine
    warped = ndimage.affine_transform(
        (np.asarray(subject_mask) > 0).astype(np.uint8),
        grid_to_subject_voxel[:3, :3],
        offset=grid_to_subject_voxel[:3, 3],
        output_shape=atlas_fraction.shape,
        order=0,
        mode="constant",
        cval=0,
    ).astype(bool)
    total = atlas_lung.sum() + warped.sum()
    return float(2.0 * np.logical_and(atlas_lung, warped).sum() / total) if total else 0.0


class AtlasRegistration(Transform):
    """Register a subject lung mask to an atlas lung mask (affine, ITK).

    Args:
        atlas: an :class:`Atlas` or the name of one (see :func:`drasclr_ext.atlas.load_atlas`).
        atlas_path: folder of the atlas files, for atlases that need it.
        grid_mm: spacing of the grid the masks are block-averaged onto before registering.
        shrink_factors: multi-resolution shrink factors (relative to ``grid_mm``).
        smoothing_sigmas: Gaussian smoothing per level, in mm.
        iterations: maximum optimiser iterations per level.
        sampling_fraction: fraction of the fixed voxels the metric samples (random, seeded), one per level or one
            for all.
        min_dice: a result below this Dice raises :class:`RegistrationError`.
        scale_range: singular values of the linear part outside this range raise :class:`RegistrationError`.
        threads: ITK threads.
        seed: seed of the metric sampling (registration is deterministic given the seed and threads).
        method: ``"itk"`` (the affine mask registration) or ``"moments"``: match the centroid and the spread along
            each world axis of the two lung masks (no rotation or shear, no ITK; for machines without ITK, e.g.
            building training grids of phantoms, where it agrees with ``"itk"`` to well under 1 mm).

    ``__call__(mask, affine=None)``: a (X, Y, Z) or (1, X, Y, Z) lung mask (MetaTensor with its affine, or an array
    with ``affine``), returns a :class:`RegistrationResult`.
    """

    def __init__(
        self,
        atlas: Union[Atlas, str] = "default",
        atlas_path: Optional[str] = None,
        grid_mm: float = 3.0,
        shrink_factors: Sequence[int] = (4, 2, 1),
        smoothing_sigmas: Sequence[float] = (6.0, 3.0, 1.5),
        iterations: int = 200,
        sampling_fraction: Union[float, Sequence[float]] = (0.5, 0.25, 0.1),
        min_dice: float = 0.5,
        scale_range: tuple[float, float] = (0.5, 2.0),
        threads: int = 2,
        seed: int = 0,
        method: str = "itk",
    ) -> None:
        if method not in ("itk", "moments"):
            raise ValueError(f"unknown registration method {method!r}: use 'itk' or 'moments'")
        self.method = method
        self.atlas = load_atlas(atlas, atlas_path)
        self.grid_mm = float(grid_mm)
        self.shrink_factors = [int(s) for s in shrink_factors]
        self.smoothing_sigmas = [float(s) for s in smoothing_sigmas]
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise ValueError("shrink_factors and smoothing_sigmas need one value per level")
        self.iterations = int(iterations)
        self.sampling_fraction = sampling_fraction
        self.min_dice = float(min_dice)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.threads = int(threads)
        self.seed = int(seed)
        self._atlas_grid: Optional[tuple[np.ndarray, np.ndarray]] = None

    @property
    def atlas_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """The atlas lung fraction on the registration grid and its affine (computed once)."""
        if self._atlas_grid is None:
            self._atlas_grid = block_average(self.atlas.mask, self.atlas.affine, self.grid_mm)
        return self._atlas_grid

    def __call__(self, mask: Any, affine: Optional[np.ndarray] = None) -> RegistrationResult:
        start = time.perf_counter()
        array, affine = array_and_affine(mask, affine, "lung mask")
        lung_voxels = int(np.count_nonzero(array))
        if lung_voxels == 0:
            raise RegistrationError(
                "the subject lung mask is empty, nothing to register; check the lung mask (and that the scan covers "
                "the chest)"
            )
        fixed_array, fixed_affine = self.atlas_grid
        moving_array, moving_affine = block_average(array, affine, self.grid_mm)
        try:
            register = _moment_match if self.method == "moments" else self._register
            matrix, metric, iterations, stop = register(fixed_array, fixed_affine, moving_array, moving_affine)
        except RegistrationError:
            raise
        except Exception as e:  # ITK raises RuntimeError with a long text: keep its first line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise RegistrationError(
                f"ITK registration of the lung mask to atlas {self.atlas.name!r} failed ({reason}); check the lung "
                "mask and that the scan covers both lungs"
            ) from e
        result = RegistrationResult(
            atlas_to_subject=matrix,
            metric=metric,
            iterations=iterations,
            atlas_name=self.atlas.name,
            stop_condition=stop,
        )
        self._check_linear_part(result)
        result.dice = dice_in_atlas_space(array, affine, fixed_array, fixed_affine, result.atlas_to_subject)
        result.seconds = time.perf_counter() - start
        if not result.dice >= self.min_dice:
            raise RegistrationError(
                f"registration to atlas {self.atlas.name!r} diverged: Dice of the warped lung mask vs the atlas is "
                f"{result.dice:.3f} (< {self.min_dice}); check the lung mask (both lungs, no body or bowel gas) and "
                "that the scan covers the whole chest"
            )
        return result

    def _check_linear_part(self, result: RegistrationResult) -> None:
        singular = np.linalg.svd(result.atlas_to_subject[:3, :3], compute_uv=False)
        det = float(np.linalg.det(result.atlas_to_subject[:3, :3]))
        lo, hi = self.scale_range
        if not np.all(np.isfinite(result.atlas_to_subject)) or det <= 0 or singular.min() < lo or singular.max() > hi:
            raise RegistrationError(
                f"registration to atlas {self.atlas.name!r} diverged: the affine's scales are "
                f"{np.round(singular, 3).tolist()} (allowed {lo}-{hi}) and its determinant {det:.3f}; check the lung "
                "mask and that the scan covers both lungs at a normal field of view"
            )

    def _register(
        self, fixed_array: np.ndarray, fixed_affine: np.ndarray, moving_array: np.ndarray, moving_affine: np.ndarray
    ) -> tuple[np.ndarray, float, int, str]:
        api = _itk_classes()
        api.threads.SetGlobalDefaultNumberOfThreads(self.threads)
        fixed = _itk_image(fixed_array, fixed_affine)
        moving = _itk_image(moving_array, moving_affine)

        # centre-of-mass initialisation: ITK Python wraps CenteredTransformInitializer for rigid transforms only,
        # so initialise a rigid one in MOMENTS mode and copy its centre and translation into the affine
        rigid = api.rigid.New()
        initializer = api.initializer.New()
        initializer.SetTransform(rigid)
        initializer.SetFixedImage(fixed)
        initializer.SetMovingImage(moving)
        initializer.MomentsOn()
        initializer.InitializeTransform()
        transform = api.affine.New()
        transform.SetCenter(rigid.GetCenter())
        transform.SetTranslation(rigid.GetTranslation())

        metric = api.metric.New()
        # central-difference gradients instead of recursive-Gaussian gradient images: faster, as accurate on
        # block-averaged masks
        metric.SetUseMovingImageGradientFilter(False)
        metric.SetUseFixedImageGradientFilter(False)
        scales = api.scales.New()
        scales.SetMetric(metric)
        optimizer = api.optimizer.New()
        optimizer.SetLearningRate(4.0)
        optimizer.SetMinimumStepLength(1e-3)
        optimizer.SetRelaxationFactor(0.6)
        optimizer.SetNumberOfIterations(self.iterations)
        optimizer.SetGradientMagnitudeTolerance(1e-6)
        optimizer.SetReturnBestParametersAndValue(True)
        optimizer.SetScalesEstimator(scales)

        registration = api.method.New()
        registration.SetFixedImage(fixed)
        registration.SetMovingImage(moving)
        registration.SetMetric(metric)
        registration.SetOptimizer(optimizer)
        registration.SetInitialTransform(transform)
        registration.InPlaceOn()
        registration.SetNumberOfLevels(len(self.shrink_factors))
        registration.SetShrinkFactorsPerLevel(self.shrink_factors)
        registration.SetSmoothingSigmasPerLevel(self.smoothing_sigmas)
        registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        registration.SetMetricSamplingStrategy(api.sampling.MetricSamplingStrategy_RANDOM)
        fractions = self.sampling_fraction
        if np.ndim(fractions) == 0:
            fractions = [float(fractions)] * len(self.shrink_factors)
        registration.SetMetricSamplingPercentagePerLevel([float(f) for f in fractions])
        registration.MetricSamplingReinitializeSeed(self.seed)
        registration.Update()

        # ITK: fixed (atlas) LPS point -> moving (subject) LPS point, y = M x + offset
        linear = transform.GetMatrix()
        m = np.array([[linear(i, j) for j in range(3)] for i in range(3)], dtype=np.float64)
        offset = np.array(transform.GetOffset(), dtype=np.float64)
        lps = np.eye(4)
        lps[:3, :3], lps[:3, 3] = m, offset
        matrix = _LPS @ lps @ _LPS
        return (
            matrix,
            float(optimizer.GetValue()),
            int(optimizer.GetCurrentIteration()),
            str(optimizer.GetStopConditionDescription()),
        )


def _moments(fraction: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and standard deviation along each world axis (mm) of a lung-fraction map."""
    idx = np.argwhere(fraction > 0)
    if not len(idx):
        raise RegistrationError("the lung mask is empty on the registration grid; check the lung mask")
    points = apply_affine(affine, idx)
    weight = fraction[tuple(idx.T)].astype(np.float64)
    centre = np.average(points, axis=0, weights=weight)
    spread = np.sqrt(np.average((points - centre) ** 2, axis=0, weights=weight))
    return centre, spread


def _moment_match(
    fixed_array: np.ndarray, fixed_affine: np.ndarray, moving_array: np.ndarray, moving_affine: np.ndarray
) -> tuple[np.ndarray, float, int, str]:
    """Atlas (fixed) -> subject (moving) affine matching centroids and per-axis spreads (RAS world)."""
    fixed_centre, fixed_spread = _moments(fixed_array, fixed_affine)
    moving_centre, moving_spread = _moments(moving_array, moving_affine)
    scale = moving_spread / np.maximum(fixed_spread, 1e-6)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scale)
    matrix[:3, 3] = moving_centre - scale * fixed_centre
    return matrix, float("nan"), 0, "moments"


class AtlasRegistrationd(MapTransform):
    """Dictionary twin of :class:`AtlasRegistration`: registers ``d[key]`` (the lung mask) and stores the
    :class:`RegistrationResult` under ``result_key``."""

    def __init__(
        self,
        keys: KeysCollection = "lung_mask",
        result_key: str = "registration",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.result_key = result_key
        self.registration = AtlasRegistration(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.result_key] = self.registration(d[key])
        return d
