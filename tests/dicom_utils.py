"""Writing small synthetic CT DICOM series with pydicom for the reader tests."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest


def write_dicom_series(
    folder: Path,
    n: int,
    series_uid: str,
    slope: float,
    intercept: float,
    stored: np.ndarray,
    positions: Sequence[float] | None = None,
):
    """A minimal CT DICOM series (pydicom), one file per axial slice, stored values ``stored[..., k]``, slice ``k``
    at z = ``positions[k]`` mm (default 100 + 2k)."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"s{series_uid[-1]}_{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer, ds.ConvolutionKernel, ds.KVP = "CT", "Acme", "B30f", 100
        ds.PatientName, ds.PatientID = "Test", "T1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", series_uid, "1.2.3.9"
        ds.SeriesNumber, ds.InstanceNumber = int(series_uid[-1]), k + 1
        ds.SliceThickness, ds.PixelSpacing = 2.0, [0.5, 0.6]  # row spacing (y), column spacing (x)
        ds.ImagePositionPatient = [-10.0, -20.0, 100.0 + 2.0 * k if positions is None else positions[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype(np.uint16)).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
