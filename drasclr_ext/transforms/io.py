"""Reading CT scans (NIfTI, NRRD, MHA/MHD, DICOM series folders) into HU MetaTensors, and writing results back.

Every reader returns the same thing: a float32 ``MetaTensor`` of shape (X, Y, Z) in Hounsfield units whose
``affine`` is the RAS voxel-to-world matrix of MONAI's readers (``NibabelReader`` for NIfTI, ``ITKReader``'s
LPS-to-RAS conversion for everything ITK reads). ``save_like`` writes any label map or image back as a NIfTI
with exactly the geometry of the scan it came from.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from drasclr_ext.errors import InputImageError
from drasclr_ext.fileio import NIFTI_SUFFIXES, write_nifti
from drasclr_ext.geometry import affine_of, spatial_array, voxel_spacing
from drasclr_ext.subjects import subject_name
from drasclr_ext.transforms.validate import check_ct_array

PathLike = Union[str, os.PathLike]

# DICOM tags copied into meta["acquisition"]; unknown numbers are NaN and unknown texts "" (not None, which
# MONAI's default collation cannot batch).
_DICOM_TEXT_TAGS = {
    "modality": "0008|0060",
    "convolution_kernel": "0018|1210",
    "manufacturer": "0008|0070",
    "manufacturer_model": "0008|1090",
    "series_description": "0008|103e",
    "series_instance_uid": "0020|000e",
    "contrast_bolus_agent": "0018|0010",  # ContrastBolusAgent: present when contrast was given (contrast_enhanced flag)
}
_DICOM_NUMBER_TAGS = {"slice_thickness": "0018|0050", "kvp": "0018|0060"}
_DICOM_PIXEL_SPACING = "0028|0030"
_DICOM_POSITION = "0020|0032"  # ImagePositionPatient, LPS mm of the first voxel of the slice
_DICOM_ORIENTATION = "0020|0037"  # ImageOrientationPatient, row and column direction cosines
DUPLICATE_TOLERANCE_MM = 0.01  # two slices closer than this along the normal share one position
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

_READ_ADVICE = "Check that the file is a complete NIfTI/NRRD/MHA or a DICOM series folder"


def empty_acquisition() -> dict[str, Any]:
    """The ``meta["acquisition"]`` of a scan without a DICOM header: every fact unknown (NaN or "")."""
    acq: dict[str, Any] = {k: "" for k in _DICOM_TEXT_TAGS}
    acq.update({k: float("nan") for k in _DICOM_NUMBER_TAGS})
    acq["pixel_spacing"] = [float("nan"), float("nan")]
    acq["dicom_series_in_folder"] = 0
    return acq


def _dicom_header(filename: str) -> dict[str, str]:
    """The text value of every DICOM tag of one file, read with ITK's GDCM IO (no pixel data)."""
    import itk

    io = itk.GDCMImageIO.New()
    io.SetFileName(filename)
    io.ReadImageInformation()
    md = io.GetMetaDataDictionary()
    return {k: str(md[k]).strip() for k in md.GetKeys() if not k.startswith("ITK_")}


def _to_float(text: str) -> float:
    try:
        return float(text.split("\\")[0])
    except (ValueError, IndexError):
        return float("nan")


def acquisition_from_dicom(header: Mapping[str, str], n_series: int = 1) -> dict[str, Any]:
    """Acquisition facts (slice thickness, kernel, manufacturer, kVp, pixel spacing...) from a DICOM header."""
    acq = empty_acquisition()
    for key, tag in _DICOM_TEXT_TAGS.items():
        acq[key] = header.get(tag, "").strip()
    for key, tag in _DICOM_NUMBER_TAGS.items():
        acq[key] = _to_float(header.get(tag, ""))
    if _DICOM_PIXEL_SPACING in header:
        parts = header[_DICOM_PIXEL_SPACING].split("\\")
        if len(parts) == 2:
            acq["pixel_spacing"] = [_to_float(parts[0]), _to_float(parts[1])]
    acq["dicom_series_in_folder"] = int(n_series)
    return acq


def select_dicom_series(folder: PathLike) -> tuple[list[str], dict[str, str], int]:
    """File names of the CT series with the most slices in ``folder``, its first header, and the series count.

    Raises:
        InputImageError: no DICOM series, or none of modality CT.
    """
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(str(folder))
    uids = list(names.GetSeriesUIDs())
    if not uids:
        raise InputImageError(
            f"could not read {folder}: the folder holds no DICOM series. {_READ_ADVICE} "
            "(DICOM files of one series directly inside the folder)."
        )
    best: tuple[int, list[str], dict[str, str]] | None = None
    modalities = []
    for uid in uids:
        files = [str(f) for f in names.GetFileNames(uid)]
        header = _dicom_header(files[0])
        modality = header.get("0008|0060", "").strip().upper()
        modalities.append(modality or "unknown")
        if modality not in ("CT", "") or (best is not None and len(files) <= best[0]):
            continue
        best = (len(files), files, header)
    if best is None:
        raise InputImageError(
            f"{folder} holds no CT series (DICOM modalities found: {', '.join(sorted(set(modalities)))}). "
            "Give the folder of a CT series."
        )
    return best[1], best[2], len(uids)


def _floats(text: str, count: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        return None
    return values if values.shape == (count,) and np.all(np.isfinite(values)) else None


def _slice_tolerance(step: float) -> float:
    """How far (mm) a slice may sit from its place on an evenly spaced grid: rounding in the headers, no more."""
    return max(0.01, 0.02 * step)


def _describe_spacing_problems(positions: np.ndarray, files: Sequence[str], step: float, name: str) -> str | None:
    """The reason why the sorted slice positions are not evenly spaced by ``step``, or None when they are."""
    tol = _slice_tolerance(step)
    problems, missing, uneven = [], 0, 0
    for k, gap in enumerate(np.diff(positions)):
        multiple = int(round(gap / step))
        where = f"between {positions[k]:.2f} and {positions[k + 1]:.2f} mm ({Path(files[k]).name}, "
        where += f"{Path(files[k + 1]).name})"
        if multiple >= 2 and abs(gap - multiple * step) <= tol * multiple:
            missing += multiple - 1
            problems.append(f"{multiple - 1} missing {where}")
        elif abs(gap - step) > tol:
            uneven += 1
            problems.append(f"a gap of {gap:.3f} mm {where}")
    if not problems:
        return None
    shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
    kind = "the slices are unevenly spaced" if uneven else f"{missing} slice(s) are missing"
    return (
        f"{name}: {kind} (slices are {step:.3f} mm apart: {shown}). The series is incomplete or mixes stacks; give "
        "the complete series (check whether slices were split into another series), or resample it first"
    )


def dicom_slice_geometry(files: Sequence[str], headers: Sequence[Mapping[str, str]], name: str = "") -> tuple:
    """Slices sorted along their normal, the LPS position of the first, and the LPS step vector between slices.

    The geometry comes from every slice's ImagePositionPatient projected on the normal of ImageOrientationPatient,
    never from SpacingBetweenSlices or a reader's guess; each slice is checked to lie on one evenly spaced line.

    Returns:
        (files sorted from the lowest to the highest position along the normal, origin (3,), step vector (3,)).

    Raises:
        InputImageError: missing position/orientation, mixed orientations, duplicate positions, missing slices,
            uneven spacing or a gantry tilt.
    """
    name = name or "the DICOM series"
    positions = [_floats(h.get(_DICOM_POSITION, ""), 3) for h in headers]
    orientations = [_floats(h.get(_DICOM_ORIENTATION, ""), 6) for h in headers]
    lacking = [Path(f).name for f, p, o in zip(files, positions, orientations) if p is None or o is None]
    if lacking:
        raise InputImageError(
            f"{name}: {len(lacking)} slice(s) lack ImagePositionPatient/ImageOrientationPatient (e.g. {lacking[0]}), "
            "so their place in the volume is unknown. Give a CT series exported with its geometry"
        )
    iop = np.stack(orientations)
    if np.abs(iop - iop[0]).max() > 1e-3:
        raise InputImageError(
            f"{name}: the slices have different orientations (ImageOrientationPatient): the folder mixes stacks "
            "(e.g. axial and localiser images). Give one axial series"
        )
    normal = np.cross(iop[0, :3], iop[0, 3:])
    normal /= np.linalg.norm(normal)
    ipp = np.stack(positions)
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    files, ipp, along = [files[i] for i in order], ipp[order], along[order]
    gaps = np.diff(along)
    if np.any(gaps < DUPLICATE_TOLERANCE_MM):
        k = int(np.argmax(gaps < DUPLICATE_TOLERANCE_MM))
        raise InputImageError(
            f"{name}: {int(np.sum(gaps < DUPLICATE_TOLERANCE_MM))} slice(s) share a position with another (e.g. "
            f"{Path(files[k]).name} and {Path(files[k + 1]).name} at {along[k]:.2f} mm): duplicate slices or two "
            "acquisitions in one series. Give a series with one slice per position"
        )
    reason = _describe_spacing_problems(along, files, float(np.median(gaps)), name)
    if reason:
        raise InputImageError(reason)
    step = (along[-1] - along[0]) / (len(files) - 1)
    off_line = ipp - ipp[0] - np.outer(along - along[0], normal)  # in-plane shift of each slice
    if np.abs(off_line).max() > _slice_tolerance(step):
        raise InputImageError(
            f"{name}: the slices shift in-plane by up to {np.abs(off_line).max():.2f} mm from one to the next "
            "(gantry tilt): a volume with square voxels cannot hold them. Resample the series first (e.g. dcm2niix "
            "corrects gantry tilt)"
        )
    return files, ipp[0], step * normal


def _read_itk(source: str | list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read with ITK as float32 (GDCM applies rescale slope/intercept); affine converted LPS->RAS by MONAI."""
    import itk
    from monai.data import ITKReader

    image = itk.imread(source, pixel_type=itk.F) if isinstance(source, list) else itk.imread(source)
    n_components = image.GetNumberOfComponentsPerPixel()
    if n_components > 1:
        raise InputImageError(
            f"{source if isinstance(source, str) else source[0]} has {n_components} components per voxel (RGB or "
            "multi-channel): a CT is a single-channel volume in HU. Give the CT scan itself."
        )
    reader = ITKReader(affine_lps_to_ras=True)
    data, meta = reader.get_data(image)
    return np.asarray(data), np.asarray(meta["affine"], dtype=np.float64), meta


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI with nibabel, scaled straight to float32 (no float64 copy); affine as MONAI's NibabelReader."""
    import nibabel as nib

    img = nib.load(path)
    proxy = img.dataobj
    if img.get_data_dtype().names is not None:  # RGB24 / RGBA32 structured voxels
        raise InputImageError(
            f"{path} is a colour (RGB) image: a CT is a single-channel 3D volume in HU. Give the CT scan itself."
        )
    data = np.asarray(proxy, dtype=np.float32)  # scl_slope/scl_inter applied in float32
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_any(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Array, RAS affine and acquisition facts of a file or DICOM folder; InputImageError when unreadable."""
    acquisition = empty_acquisition()
    if not path.exists():
        raise InputImageError(f"could not read {path}: it does not exist. Check the path.")
    geometry = None
    if path.is_dir():
        files, header, n_series = select_dicom_series(path)
        acquisition = acquisition_from_dicom(header, n_series)
        if len(files) > 1:
            files, *geometry = dicom_slice_geometry(files, [_dicom_header(f) for f in files], name=str(path))
        source: str | list[str] = files
    else:
        if path.stat().st_size == 0:
            raise InputImageError(f"could not read {path}: the file is empty (0 bytes). {_READ_ADVICE}.")
        source = str(path)
    try:
        if isinstance(source, str) and source.lower().endswith(NIFTI_SUFFIXES):
            data, affine = _read_nifti(source)
        else:
            data, affine, _ = _read_itk(source)
    except InputImageError:
        raise
    except Exception as err:  # readers raise many types (EOFError, RuntimeError, zlib errors, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputImageError(f"could not read {path}: {reason}. {_READ_ADVICE}.") from err
    if geometry is not None and data.ndim == 3 and data.shape[2] == len(source):
        affine = affine.copy()  # slice axis and origin from the slice positions (RAS), in-plane axes as read
        affine[:3, 2] = LPS_TO_RAS @ geometry[1]
        affine[:3, 3] = LPS_TO_RAS @ geometry[0]
    return data, affine, acquisition


def load_ct(path: PathLike) -> MetaTensor:
    """Read a CT scan as a float32 HU ``MetaTensor`` of shape (X, Y, Z) with its RAS affine.

    Args:
        path: a NIfTI (.nii, .nii.gz), NRRD, MHA/MHD file, or a folder of DICOM files (the CT series with the
            most slices is read, rescale slope/intercept applied).

    Returns:
        MetaTensor whose ``meta`` holds ``filename_or_obj``, ``subject``, ``spacing`` (mm, 3 floats),
        ``acquisition`` (DICOM facts, NaN/"" when unknown), ``affine``/``original_affine`` and ``spatial_shape``.

    Raises:
        InputImageError: unreadable, empty or truncated file, not a 3D single-channel CT in HU.
    """
    path = Path(path)
    data, affine, acquisition = _read_any(path)
    data, affine = check_ct_array(data, affine, name=str(path))
    spacing = voxel_spacing(affine)
    meta = {
        "filename_or_obj": str(path),
        "subject": subject_name(path),
        "spacing": spacing.astype(np.float64),
        "acquisition": acquisition,
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(data.shape),
        "space": "RAS",
    }
    # no C-order copy: NIfTI and ITK arrays come Fortran-ordered, and transposing 300 MB costs seconds
    return MetaTensor(torch.from_numpy(np.asarray(data, dtype=np.float32)), affine=affine, meta=meta)


def save_like(
    array: np.ndarray | torch.Tensor,
    reference: MetaTensor,
    path: PathLike,
    dtype: np.dtype | type | str = np.float32,
) -> Path:
    """Write ``array`` as a NIfTI with exactly the affine and shape of ``reference`` (atomically).

    Args:
        array: (X, Y, Z) or (1, X, Y, Z), the same spatial shape as ``reference``.
        reference: the scan the array belongs to (e.g. ``load_ct``'s output); its ``affine`` is written.
        path: output file ending in .nii.gz or .nii.
        dtype: voxel type on disk, e.g. ``np.uint8`` for label maps.
    """
    arr = spatial_array(array)
    ref_shape = tuple(spatial_array(reference).shape) if isinstance(reference, torch.Tensor) else None
    if ref_shape is not None and tuple(arr.shape) != ref_shape:
        raise ValueError(f"array shape {tuple(arr.shape)} differs from the reference's {ref_shape}")
    return write_nifti(path, arr, affine_of(reference), dtype)


class LoadCT(Transform):
    """Array transform: path -> channel-first (1, X, Y, Z) float32 HU ``MetaTensor`` (see ``load_ct``)."""

    def __init__(self, channel_first: bool = True) -> None:
        self.channel_first = channel_first

    def __call__(self, path: PathLike) -> MetaTensor:
        image = load_ct(path)
        return image.unsqueeze(0) if self.channel_first else image


class LoadCTd(MapTransform):
    """Dictionary twin of ``LoadCT``: replaces each path under ``keys`` by its (1, X, Y, Z) HU ``MetaTensor``."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCT(channel_first=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


__all__: Sequence[str] = [
    "LoadCT",
    "LoadCTd",
    "acquisition_from_dicom",
    "dicom_slice_geometry",
    "empty_acquisition",
    "load_ct",
    "save_like",
    "select_dicom_series",
]
