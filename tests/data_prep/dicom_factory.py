"""Small, hand-made DICOM files for the bad-input tests (each file one deliberate defect)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

FAKE_PHI = {
    "PatientName": "Doe^Janet",
    "PatientID": "PID-7734921",
    "PatientBirthDate": "19610417",
    "InstitutionName": "Saint Example Hospital",
    "AccessionNumber": "ACC99812",
}


def write_ct(path: Path, hu: np.ndarray, *, z: float, series_uid: str, study_uid: str, modality: str = "CT",
             pixels: bool = True, intercept: float = -1024.0, slope: float = 1.0, instance: int = 1,
             phi: dict[str, str] | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study_uid
    for k, v in (phi or FAKE_PHI).items():
        setattr(ds, k, v)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = hu.shape
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    if pixels:
        stored = np.round((hu.astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int, size: int = 32, *, seed: int = 0, shuffle_names: bool = True,
                 phi: dict[str, str] | None = None) -> list[Path]:
    """``n`` slices whose HU encode their z (so order can be checked), file names not in z order."""
    rng = np.random.default_rng(seed)
    series, study = generate_uid(), generate_uid()
    order = rng.permutation(n) if shuffle_names else np.arange(n)
    paths = []
    for i in range(n):
        hu = np.full((size, size), -1000, np.int16)
        hu[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 10 * i  # slice i has HU 10*i inside
        paths.append(write_ct(folder / f"IM{order[i]:04d}", hu, z=2.0 * i, series_uid=series, study_uid=study,
                              instance=int(order[i]) + 1, phi=phi))
    return paths
