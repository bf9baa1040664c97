"""Write phantom slices as CT Image Storage DICOM files, with fake but realistic-looking PHI.

The files deliberately vary the way real scanners do, so that readers are exercised: unsigned
12-bit storage for some patients and signed 16-bit storage with a PixelPaddingValue outside the
reconstruction circle for others (both with RescaleIntercept -1024), optional RLE / JPEG 2000
lossless compression, and file names that are not in slice order.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from ctssl_base.errors import UserError

COMPRESSIONS: dict[str | None, str] = {None: ExplicitVRLittleEndian, "none": ExplicitVRLittleEndian,
                                       "rle": RLELossless, "jpeg2000": JPEG2000Lossless}
STORAGES = ("unsigned", "signed")
INTERCEPT = -1024
PADDING_STORED = -2000  # stored value of pixels outside the reconstruction circle (signed storage)

_FIRST = ("Alma", "Bruno", "Carla", "Dmitri", "Edda", "Farid", "Greta", "Hugo", "Ilse", "Jonas", "Katja",
          "Lorenz", "Mira", "Nils", "Olga", "Piet", "Quirin", "Rosa", "Sven", "Tilde")
_LAST = ("Achterberg", "Brandauer", "Castellani", "Dunkelmann", "Eberhardt", "Falkenrath", "Gruenwald",
         "Hollerbach", "Imhoff", "Jankowski", "Kettelhack", "Lindqvist", "Morgenstern", "Nussbaumer",
         "Oberlander", "Pfefferkorn", "Quandtmeyer", "Rosenthaler", "Schwanhild", "Tannenberg")
_INSTITUTIONS = ("St. Phantom General Hospital", "Klinikum Phantomstadt", "Mercy Phantom Medical Center",
                 "Phantom Valley University Hospital")


@dataclass(frozen=True)
class FakePHI:
    """Fake identifying values of one phantom patient. Deterministic per (seed, patient index), so a
    test can recompute them and scan outputs for them without reading the DICOMs."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    institution: str
    institution_address: str
    referring_physician: str
    operator: str
    accession: str
    study_date: str
    study_time: str
    study_id: str
    other_patient_id: str
    station: str
    study_uid: str
    series_uid: str
    frame_uid: str

    def searchable(self) -> dict[str, str]:
        """Values distinctive enough to grep outputs for (not sex or single digits)."""
        return {"PatientName": self.patient_name, "PatientID": self.patient_id,
                "PatientBirthDate": self.birth_date, "InstitutionName": self.institution,
                "InstitutionAddress": self.institution_address,
                "ReferringPhysicianName": self.referring_physician, "AccessionNumber": self.accession,
                "OtherPatientIDs": self.other_patient_id, "StudyInstanceUID": self.study_uid,
                "SeriesInstanceUID": self.series_uid, "FrameOfReferenceUID": self.frame_uid}


def fake_phi(seed: int, index: int) -> FakePHI:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index, 0xF1])
    first, last = _FIRST[rng.integers(len(_FIRST))], _LAST[rng.integers(len(_LAST))]
    by, bm, bd = rng.integers(1935, 2001), rng.integers(1, 13), rng.integers(1, 29)
    sy, sm, sd = rng.integers(2012, 2025), rng.integers(1, 13), rng.integers(1, 29)
    inst = _INSTITUTIONS[rng.integers(len(_INSTITUTIONS))]
    pid = f"PHX{seed % 1000:03d}{index:04d}{rng.integers(10**5):05d}"

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["ctssl-phantom", str(seed), str(index), kind])

    return FakePHI(
        patient_name=f"{last}^{first}",
        patient_id=pid,
        birth_date=f"{by:04d}{bm:02d}{bd:02d}",
        sex=str(rng.choice(["F", "M"])),
        institution=inst,
        institution_address=f"{rng.integers(1, 400)} Phantom Road, Phantomstadt {rng.integers(10000, 99999)}",
        referring_physician=f"{_LAST[rng.integers(len(_LAST))]}^{_FIRST[rng.integers(len(_FIRST))]}^Dr",
        operator=f"{_LAST[rng.integers(len(_LAST))]}^{_FIRST[rng.integers(len(_FIRST))]}",
        accession=f"ACC{rng.integers(10**8):08d}",
        study_date=f"{sy:04d}{sm:02d}{sd:02d}",
        study_time=f"{rng.integers(7, 19):02d}{rng.integers(60):02d}{rng.integers(60):02d}",
        study_id=f"{rng.integers(10**6):06d}",
        other_patient_id=f"MRN-{rng.integers(10**7):07d}",
        station=f"CTPHX{rng.integers(100):02d}",
        study_uid=uid("study"), series_uid=uid("series"), frame_uid=uid("frame"),
    )


@dataclass(frozen=True)
class SeriesGeometry:
    rows: int
    cols: int
    spacing_mm: tuple[float, float]  # (row, col)
    slice_thickness_mm: float
    origin_xy_mm: tuple[float, float]


@functools.lru_cache(maxsize=8)
def outside_fov(rows: int, cols: int) -> np.ndarray:
    """Pixels outside the reconstruction circle (the largest centred circle), as scanners pad them."""
    yy, xx = np.ogrid[:rows, :cols]
    r = min(rows, cols) / 2.0
    return ((yy - (rows - 1) / 2.0) ** 2 + (xx - (cols - 1) / 2.0) ** 2) > r * r


def stored_pixels(hu: np.ndarray, storage: str) -> np.ndarray:
    """HU -> stored values for ``storage`` (the inverse of the modality LUT with intercept -1024)."""
    if storage == "unsigned":
        return np.clip(hu.astype(np.int32) - INTERCEPT, 0, 4095).astype(np.uint16)
    if storage == "signed":
        stored = (hu.astype(np.int16) - np.int16(INTERCEPT)).astype(np.int16)
        stored[..., outside_fov(hu.shape[-2], hu.shape[-1])] = PADDING_STORED
        return stored
    raise ValueError(f"unknown storage {storage!r}; expected one of {STORAGES}")


class SeriesWriter:
    """Writes the slices of one series; the header template is built once per series."""

    def __init__(self, phi: FakePHI, geom: SeriesGeometry, storage: str, compress: str | None,
                 seed: int, index: int):
        if compress not in COMPRESSIONS:
            raise UserError(f"unknown compression {compress!r}; expected one of none, rle, jpeg2000")
        self.phi, self.geom, self.storage = phi, geom, storage
        self.syntax = COMPRESSIONS[compress]
        self.seed, self.index = seed, index
        self._encoded: list[tuple[int, bytes | None]] | None = None

    def _sop(self, slice_no: int) -> str:
        return generate_uid(entropy_srcs=["ctssl-phantom", str(self.seed), str(self.index), "sop", str(slice_no)])

    def _dataset(self, slice_no: int, instance: int, z_mm: float) -> Dataset:
        phi, g = self.phi, self.geom
        sop = self._sop(slice_no)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = phi.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = phi.study_time
        ds.AccessionNumber = phi.accession
        ds.Modality = "CT"
        ds.Manufacturer = "ctssl phantom"
        ds.InstitutionName = phi.institution
        ds.InstitutionAddress = phi.institution_address
        ds.ReferringPhysicianName = phi.referring_physician
        ds.StationName = phi.station
        ds.StudyDescription = "CT CHEST ABDOMEN PELVIS"
        ds.SeriesDescription = "AXIAL 1 PHANTOM"
        ds.OperatorsName = phi.operator
        ds.ManufacturerModelName = "SynthCT"
        ds.PatientName = phi.patient_name
        ds.PatientID = phi.patient_id
        ds.PatientBirthDate = phi.birth_date
        ds.PatientSex = phi.sex
        ds.OtherPatientIDs = phi.other_patient_id
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{g.slice_thickness_mm:.4g}"
        ds.SpacingBetweenSlices = f"{g.slice_thickness_mm:.4g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = phi.study_uid
        ds.SeriesInstanceUID = phi.series_uid
        ds.StudyID = phi.study_id
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [f"{g.origin_xy_mm[0]:.4f}", f"{g.origin_xy_mm[1]:.4f}", f"{z_mm:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = phi.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z_mm:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = g.rows, g.cols
        ds.PixelSpacing = [f"{g.spacing_mm[0]:.6f}", f"{g.spacing_mm[1]:.6f}"]
        ds.BitsAllocated = 16
        if self.storage == "unsigned":
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        else:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            ds.PixelPaddingValue = PADDING_STORED
            ds["PixelPaddingValue"].VR = "SS"  # signed storage (the dictionary says "US or SS")
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept = str(INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        return ds

    def write(self, path: Path, hu: np.ndarray, slice_no: int, instance: int, z_mm: float) -> None:
        arr = stored_pixels(hu, self.storage)
        if self.syntax != ExplicitVRLittleEndian:
            ds = self._dataset(slice_no, instance, z_mm)
            ds.compress(self.syntax, arr, generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)
            return
        # Uncompressed: the header is the same for every slice of the series except four elements,
        # so the constant elements are encoded once and each file is a concatenation of bytes
        # (encoding ~60 elements per file with pydicom cost as much as rendering the slice).
        if self._encoded is None:
            self._encoded = self._encode_template()
        ds = self._dataset_varying(slice_no, instance, z_mm)
        parts = [b"\0" * 128, b"DICM", _encode_meta(ds.file_meta)]
        for tag, const in self._encoded:
            parts.append(const if const is not None else _encode_element(ds[tag]))
        data = arr.tobytes()
        parts.append(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(data)))
        parts.append(data)
        with open(path, "wb") as f:
            f.write(b"".join(parts))

    _VARYING = (0x00080018, 0x00200013, 0x00200032, 0x00201041)  # SOP UID, instance, position, location

    def _encode_template(self) -> list[tuple[int, bytes | None]]:
        ds = self._dataset(0, 1, 0.0)
        return [(int(e.tag), None if int(e.tag) in self._VARYING else _encode_element(e)) for e in ds]

    def _dataset_varying(self, slice_no: int, instance: int, z_mm: float) -> Dataset:
        sop = self._sop(slice_no)
        ds = Dataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [f"{self.geom.origin_xy_mm[0]:.4f}", f"{self.geom.origin_xy_mm[1]:.4f}",
                                   f"{z_mm:.4f}"]
        ds.SliceLocation = f"{z_mm:.4f}"
        return ds


def _encode_element(elem) -> bytes:  # noqa: ANN001 - pydicom DataElement
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem)
    return fp.getvalue()


def _encode_meta(meta: FileMetaDataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()
