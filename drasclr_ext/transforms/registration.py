"""Affine registration of a subject's lung mask to an atlas lung mask with ITK.

Fixed image = atlas mask, moving image = subject mask, both binarised and block-averaged onto a coarse grid (3 mm by
default) so the images are small and smooth; centre-of-mass initialisation (``itk.CenteredTransformInitializer``,
MOMENTS mode), an ``itk.AffineTransform``, a mean-squares metric on the mask fractions, regular-step gradient descent,
multi-resolution shrink factors 4, 2, 1 (12, 6 and 3 mm) with smoothing and random metric sampling.

Coordinates: :class:`RegistrationResult` holds ``atlas_to_subject``, a 4x4 matrix mapping atlas RAS WORLD (mm)
coordinates to subject RAS WORLD coordinates (MONAI's convention; ITK works in LPS internally and the conversion
``diag(-1, -1, 1)`` is done here), and its inverse ``subject_to_atlas``.

Modules: :mod:`~drasclr_ext.transforms.registration_result` (the result and its JSON) and
:mod:`~drasclr_ext.transforms.registration_grid` (block averaging, Dice, the ``"moments"`` method).
"""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from drasclr_ext.atlas import Atlas, load_atlas
from drasclr_ext.errors import RegistrationError
from drasclr_ext.geometry import array_and_affine, voxel_spacing
from drasclr_ext.transforms.registration_grid import block_average, dice_in_atlas_space, moment_match
from drasclr_ext.transforms.registration_result import RegistrationResult

__all__ = [
    "AtlasRegistration",
    "AtlasRegistrationd",
    "RegistrationResult",
    "block_average",
    "dice_in_atlas_space",
]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


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
        return _per_class_itk()
    except (ImportError, AttributeError):
        return _namespace_itk()


def _per_class_itk() -> SimpleNamespace:
    """:func:`_itk_classes` from ITK's per-class wrapper modules."""
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


def _namespace_itk() -> SimpleNamespace:
    """:func:`_itk_classes` from the ``itk`` namespace."""
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
        matrix, metric, iterations, stop = self._match(fixed_array, fixed_affine, moving_array, moving_affine)
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
        self._check_dice(result)
        return result

    def _match(
        self, fixed_array: np.ndarray, fixed_affine: np.ndarray, moving_array: np.ndarray, moving_affine: np.ndarray
    ) -> tuple[np.ndarray, float, int, str]:
        """The atlas -> subject matrix, metric, iterations and stop condition of the chosen method; ITK's errors
        become :class:`RegistrationError`."""
        try:
            register = moment_match if self.method == "moments" else self._register
            return register(fixed_array, fixed_affine, moving_array, moving_affine)
        except RegistrationError:
            raise
        except Exception as e:  # ITK raises RuntimeError with a long text: keep its first line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise RegistrationError(
                f"ITK registration of the lung mask to atlas {self.atlas.name!r} failed ({reason}); check the lung "
                "mask and that the scan covers both lungs"
            ) from e

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

    def _check_dice(self, result: RegistrationResult) -> None:
        if not result.dice >= self.min_dice:
            raise RegistrationError(
                f"registration to atlas {self.atlas.name!r} diverged: Dice of the warped lung mask vs the atlas is "
                f"{result.dice:.3f} (< {self.min_dice}); check the lung mask (both lungs, no body or bowel gas) and "
                "that the scan covers the whole chest"
            )

    def _register(
        self, fixed_array: np.ndarray, fixed_affine: np.ndarray, moving_array: np.ndarray, moving_affine: np.ndarray
    ) -> tuple[np.ndarray, float, int, str]:
        """The ITK affine registration of the moving (subject) fractions to the fixed (atlas) ones."""
        api = _itk_classes()
        api.threads.SetGlobalDefaultNumberOfThreads(self.threads)
        fixed = _itk_image(fixed_array, fixed_affine)
        moving = _itk_image(moving_array, moving_affine)
        transform = _centred_affine(api, fixed, moving)
        metric = api.metric.New()
        # central-difference gradients instead of recursive-Gaussian gradient images: faster, as accurate on
        # block-averaged masks
        metric.SetUseMovingImageGradientFilter(False)
        metric.SetUseFixedImageGradientFilter(False)
        optimizer = _optimizer(api, metric, self.iterations)
        registration = self._method(api, fixed, moving, metric, optimizer, transform)
        registration.Update()
        return (
            _ras_matrix(transform),
            float(optimizer.GetValue()),
            int(optimizer.GetCurrentIteration()),
            str(optimizer.GetStopConditionDescription()),
        )

    def _method(
        self, api: SimpleNamespace, fixed: Any, moving: Any, metric: Any, optimizer: Any, transform: Any
    ) -> Any:
        """The multi-resolution ITK registration method, with the levels, smoothing and metric sampling."""
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
        return registration


def _centred_affine(api: SimpleNamespace, fixed: Any, moving: Any) -> Any:
    """An ITK affine transform with the centre and translation of a centre-of-mass initialisation.

    ITK Python wraps CenteredTransformInitializer for rigid transforms only, so a rigid one is initialised in
    MOMENTS mode and its centre and translation are copied into the affine.
    """
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
    return transform


def _optimizer(api: SimpleNamespace, metric: Any, iterations: int) -> Any:
    """Regular-step gradient descent, its parameter scales estimated from physical shifts under ``metric``."""
    scales = api.scales.New()
    scales.SetMetric(metric)
    optimizer = api.optimizer.New()
    optimizer.SetLearningRate(4.0)
    optimizer.SetMinimumStepLength(1e-3)
    optimizer.SetRelaxationFactor(0.6)
    optimizer.SetNumberOfIterations(iterations)
    optimizer.SetGradientMagnitudeTolerance(1e-6)
    optimizer.SetReturnBestParametersAndValue(True)
    optimizer.SetScalesEstimator(scales)
    return optimizer


def _ras_matrix(transform: Any) -> np.ndarray:
    """The 4x4 atlas RAS -> subject RAS matrix of an ITK affine (fixed LPS point -> moving LPS point, y = M x + o)."""
    linear = transform.GetMatrix()
    m = np.array([[linear(i, j) for j in range(3)] for i in range(3)], dtype=np.float64)
    offset = np.array(transform.GetOffset(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = m, offset
    return _LPS @ lps @ _LPS


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
