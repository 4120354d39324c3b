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
from drasclr_ext.fileio import atomic_write
from drasclr_ext.transforms.validate import check_ct_array

PathLike = Union[str, os.PathLike]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
CT_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

# DICOM tags copied into meta["acquisition"]; unknown numbers are NaN and unknown texts "" (not None, which
# MONAI's default collation cannot batch).
_DICOM_TEXT_TAGS = {
    "modality": "0008|0060",
    "convolution_kernel": "0018|1210",
    "manufacturer": "0008|0070",
    "manufacturer_model": "0008|1090",
    "series_description": "0008|103e",
    "series_instance_uid": "0020|000e",
}
_DICOM_NUMBER_TAGS = {"slice_thickness": "0018|0050", "kvp": "0018|0060"}
_DICOM_PIXEL_SPACING = "0028|0030"

_READ_ADVICE = "Check that the file is a complete NIfTI/NRRD/MHA or a DICOM series folder"


def empty_acquisition() -> dict[str, Any]:
    """The ``meta["acquisition"]`` of a scan without a DICOM header: every fact unknown (NaN or "")."""
    acq: dict[str, Any] = {k: "" for k in _DICOM_TEXT_TAGS}
    acq.update({k: float("nan") for k in _DICOM_NUMBER_TAGS})
    acq["pixel_spacing"] = [float("nan"), float("nan")]
    acq["dicom_series_in_folder"] = 0
    return acq


def subject_name(path: PathLike) -> str:
    """File name without its image extension(s), or the DICOM folder's name."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    name = p.name
    for suffix in CT_SUFFIXES + (".gz",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


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
    if path.is_dir():
        files, header, n_series = select_dicom_series(path)
        acquisition = acquisition_from_dicom(header, n_series)
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
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
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


def _spatial_array(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """(X, Y, Z) numpy view of an (X, Y, Z) or channel-first (1, X, Y, Z) array or tensor."""
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def _affine_of(reference: MetaTensor | np.ndarray | torch.Tensor) -> np.ndarray:
    affine = reference.affine if isinstance(reference, MetaTensor) else reference
    affine = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    return np.asarray(affine, dtype=np.float64)


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
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"save_like writes NIfTI: {path} should end in .nii.gz or .nii")
    import nibabel as nib

    arr = _spatial_array(array)
    ref_shape = tuple(_spatial_array(reference).shape) if isinstance(reference, torch.Tensor) else None
    if ref_shape is not None and tuple(arr.shape) != ref_shape:
        raise ValueError(f"array shape {tuple(arr.shape)} differs from the reference's {ref_shape}")
    affine = _affine_of(reference)
    image = nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    return atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=f".tmp{suffix}")


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
    "CT_SUFFIXES",
    "LoadCT",
    "LoadCTd",
    "acquisition_from_dicom",
    "empty_acquisition",
    "load_ct",
    "save_like",
    "select_dicom_series",
    "subject_name",
]
