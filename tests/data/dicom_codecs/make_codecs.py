"""Rebuild the files of tests/data/dicom_codecs/ from the real CT series in tests/data/real_ct.

    .venv/bin/python tests/data/dicom_codecs/make_codecs.py

Three slices of the JPEG 2000 series are decoded, cropped to their central 256 x 256 pixels (to keep
the files small; the crop shifts ImagePositionPatient so the geometry stays true) and written again in
the transfer syntaxes that ctssl must decode but that no vendored file uses: JPEG Lossless with
first-order prediction (.70, GDCM's encoder), JPEG Lossless with predictors 2, 5 and 7 (.57, written by
:func:`jpeg_lossless` here, as GDCM writes predictor 1 only; checked to decode with GDCM bit for bit),
JPEG-LS lossless and near-lossless (CharLS through pydicom's pyjpegls encoder); one slice
also as JPEG baseline and as JPEG extended with 8-bit samples (HU / 10 + 102.4, lossy, GDCM) and one as
12-bit JPEG extended (lossy, GDCM), which no permissively licensed plugin of pydicom reads, for the reject
it must give.
Each syntax gets its own folder, and every file a new
SOPInstanceUID derived from its source and syntax, so the files of all folders can be prepped together
without being taken for copies of one another, and a rebuild writes the same UIDs. The anonymised
header is kept as it is (its Study/Series UIDs stay empty; the empty SOP Class UID is set to CT Image
Storage, which GDCM's writer requires).
"""

from __future__ import annotations

import heapq
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    generate_uid,
)

HERE = Path(__file__).resolve().parent
SERIES = HERE.parent / "real_ct" / "totalsegmentator_example_ct"
#: the source slices (file order = z order of the series) and the crop kept of each
SLICES = (4, 10, 16)
CROP = (slice(128, 384), slice(128, 384))
#: the NEAR parameter of the near-lossless JPEG-LS files (stored values differ by at most this)
JLS_NEAR = 2
#: predictors of the JPEG Lossless (Process 14) files, one per slice: GDCM writes only predictor 1 (the
#: .70 files), so these are written by :func:`jpeg_lossless` below to exercise the other predictors
JPEG_LOSSLESS_PREDICTORS = (2, 5, 7)
#: quality of the lossy 12-bit JPEG extended files (GDCM's scale, 100 = best)
JPEG_QUALITY = 95
#: folder -> (transfer syntax UID, number of slices, bits per sample)
FOLDERS = {
    "jpeg_lossless_sv1": ("1.2.840.10008.1.2.4.70", 3, 12),
    "jpeg_lossless": ("1.2.840.10008.1.2.4.57", 3, 12),
    "jpeg_ls_lossless": ("1.2.840.10008.1.2.4.80", 3, 12),
    "jpeg_ls_near_lossless": ("1.2.840.10008.1.2.4.81", 3, 12),
    "jpeg_baseline_8bit": ("1.2.840.10008.1.2.4.50", 1, 8),
    "jpeg_extended_8bit": ("1.2.840.10008.1.2.4.51", 1, 8),
    "jpeg_extended_12bit": ("1.2.840.10008.1.2.4.51", 1, 12),
}
LOSSY_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
#: the 8-bit file's rescale: HU = 10 * stored - 1024 (stored = (HU + 1024) / 10, clipped to 0..255)
EIGHT_BIT_SLOPE = 10.0


def source_files() -> list[Path]:
    files = sorted(p for p in SERIES.iterdir() if p.is_file())
    return [files[i] for i in SLICES]


def reference_stored(ds: pydicom.Dataset, bits: int = 16) -> np.ndarray:
    """The stored values the files of this folder hold for a slice of the source series (its crop);
    ``bits=8``: those of the 8-bit file, before its lossy encoding."""
    arr = ds.pixel_array[CROP]
    if bits == 8:
        hu = arr.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        arr = np.clip(np.rint((hu + 1024.0) / EIGHT_BIT_SLOPE), 0, 255).astype(np.uint8)
    return arr


def _uncompressed(src: Path, syntax: str, bits: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(src)
    eight = bits == 8
    arr = np.ascontiguousarray(reference_stored(ds, 8 if eight else 16))
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OB" if eight else "OW"
    ds.Rows, ds.Columns = arr.shape
    if eight:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = EIGHT_BIT_SLOPE, -1024.0
        for window in ("WindowCenter", "WindowWidth", "SmallestImagePixelValue", "LargestImagePixelValue"):
            if window in ds:
                del ds[window]
    # the crop's first pixel: ImagePositionPatient moves along the row and column directions
    iop = [float(x) for x in ds.ImageOrientationPatient]
    dr, dc = float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])
    r0, c0 = CROP[0].start, CROP[1].start
    ds.ImagePositionPatient = [round(float(p) + c0 * dc * iop[i] + r0 * dr * iop[3 + i], 6)
                               for i, p in enumerate(ds.ImagePositionPatient)]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[src.name, syntax, str(bits)])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _raw_16(ds: pydicom.Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns)


def gdcm_encode(ds: pydicom.Dataset, syntax: str, out: Path) -> None:
    """Write ``ds`` (uncompressed) to ``out`` in ``syntax`` with GDCM's encoder (its header kept)."""
    import gdcm

    codes = {"1.2.840.10008.1.2.4.70": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
             "1.2.840.10008.1.2.4.50": gdcm.TransferSyntax.JPEGBaselineProcess1,
             "1.2.840.10008.1.2.4.51": gdcm.TransferSyntax.JPEGExtendedProcess2_4}
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "plain.dcm")
        ds.save_as(plain, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(plain)
        if not reader.Read():
            raise RuntimeError(f"GDCM cannot read {plain}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(codes[syntax]))
        if syntax in LOSSY_JPEG:
            codec = gdcm.JPEGCodec()
            codec.SetLossless(False)
            codec.SetQuality(JPEG_QUALITY)
            change.SetUserCodec(codec)
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM cannot encode {syntax}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(out))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"GDCM cannot write {out}")


def _predictions(a: np.ndarray, predictor: int, precision: int) -> np.ndarray:
    """The prediction of every sample (ITU-T T.81 H.1.2.1): the first row from the left neighbour, the
    first column from the sample above, the first sample 2**(P-1), the rest by the selection value."""
    x = a.astype(np.int64)
    ra, rb, rc = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    ra[:, 1:], rb[1:, :], rc[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    px = {1: ra, 2: rb, 3: rc, 4: ra + rb - rc, 5: ra + ((rb - rc) >> 1), 6: rb + ((ra - rc) >> 1),
          7: (ra + rb) >> 1}[predictor].copy()
    px[0, 1:] = x[0, :-1]
    px[1:, 0] = x[:-1, 0]
    px[0, 0] = 1 << (precision - 1)
    return px


def _huffman_lengths(counts: dict[int, int]) -> dict[int, int]:
    """Code lengths of a Huffman code for the categories, with one extra leaf so that no code is all ones."""
    heap = [(c, i, [s]) for i, (s, c) in enumerate(sorted(counts.items()))] + [(0, -1, [None])]
    heapq.heapify(heap)
    depth = {s: 0 for s in counts} | {None: 0}
    while len(heap) > 1:
        c1, i1, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for sym in s1 + s2:
            depth[sym] += 1
        heapq.heappush(heap, (c1 + c2, i1, s1 + s2))
    depth.pop(None)
    assert max(depth.values()) <= 16, depth
    return depth


def jpeg_lossless(a: np.ndarray, predictor: int, precision: int) -> bytes:
    """A JPEG Lossless (Process 14, one component, Huffman coded) codestream of a 2-D unsigned image."""
    rows, cols = a.shape
    diff = (a.astype(np.int64) - _predictions(a, predictor, precision)) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff).ravel()
    cat = np.where(diff == -32768, 16, np.ceil(np.log2(np.abs(diff) + 1))).astype(int)
    counts = {int(k): int(v) for k, v in zip(*np.unique(cat, return_counts=True), strict=True)}
    lengths = _huffman_lengths(counts)
    # canonical codes: by length, then by category
    order = sorted(lengths, key=lambda s: (lengths[s], s))
    codes, code, prev = {}, 0, lengths[order[0]]
    for sym in order:
        code <<= lengths[sym] - prev
        prev = lengths[sym]
        codes[sym] = (code, prev)
        code += 1
    acc, nbits, out = 0, 0, bytearray()
    for d, s in zip(diff.tolist(), cat.tolist(), strict=True):
        c, n = codes[s]
        acc, nbits = (acc << n) | c, nbits + n
        if 0 < s < 16:
            acc, nbits = (acc << s) | ((d if d >= 0 else d - 1) & ((1 << s) - 1)), nbits + s
        while nbits >= 8:
            nbits -= 8
            byte = (acc >> nbits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0)  # byte stuffing
        acc &= (1 << nbits) - 1
    if nbits:
        byte = ((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF  # pad with ones
        out += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    bits = [sum(1 for s in order if lengths[s] == n) for n in range(1, 17)]
    dht = bytes([0x00]) + bytes(bits) + bytes(order)
    sof = struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0])
    sos = bytes([1, 1, 0x00, predictor, 0, 0])
    seg = b"".join(struct.pack(">HH", marker, len(body) + 2) + body
                   for marker, body in ((0xFFC3, sof), (0xFFC4, dht), (0xFFDA, sos)))
    return b"\xff\xd8" + seg + bytes(out) + b"\xff\xd9"


def build(dest: Path = HERE) -> list[Path]:
    written = []
    for folder, (syntax, count, bits) in FOLDERS.items():
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for n, src in enumerate(source_files()[:count]):
            out = dest / folder / f"CT{n:02d}.dcm"
            ds = _uncompressed(src, syntax, bits)
            if syntax == JPEGLSLossless:
                ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
                ds.save_as(out, enforce_file_format=True)
            elif syntax == JPEGLossless:
                stream = jpeg_lossless(_raw_16(ds), JPEG_LOSSLESS_PREDICTORS[n], int(ds.BitsStored))
                ds.PixelData = encapsulate([stream])
                ds["PixelData"].VR = "OB"
                ds.file_meta.TransferSyntaxUID = JPEGLossless
                ds.save_as(out, enforce_file_format=True)
                import gdcm  # the files must decode with GDCM, bit for bit

                reader = gdcm.ImageReader()
                reader.SetFileName(str(out))
                assert reader.Read(), out
                decoded = reader.GetImage().GetBuffer().encode("utf-8", "surrogateescape")
                assert decoded == _raw_16(_uncompressed(src, syntax, bits)).tobytes(), out
            elif syntax == JPEGLSNearLossless:
                ds.compress(JPEGLSNearLossless, encoding_plugin="pyjpegls", jls_error=JLS_NEAR,
                            generate_instance_uid=False)
                ds.save_as(out, enforce_file_format=True)
            else:
                gdcm_encode(ds, syntax, out)
            check = pydicom.dcmread(out, stop_before_pixels=True)
            assert check.file_meta.TransferSyntaxUID == syntax, (out, check.file_meta.TransferSyntaxUID)
            written.append(out)
    return written


if __name__ == "__main__":
    files = build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {total / 1e6:.2f} MB")
