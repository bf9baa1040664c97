"""MedMNIST-format ``.npz`` files (OrganSMNIST and relatives) -> labelled 8-bit slices.

The file holds ``{train,val,test}_images`` (N, H, W) uint8 (or (N, H, W, 3) for colour sets, turned
into grey; or (N, D, H, W) for the 3-D sets, each volume one series) and ``{split}_labels`` (N, k)
integers. Intensity is "gray8": pixel values 0..255 in the int16 column, not HU.

Identifiers (MedMNIST ships none): every image is its own pseudo-patient and series, so
patient-level folds treat images as independent, which is how MedMNIST itself is evaluated. The
official split is kept as the study: all images of ``train`` share one study identifier (a keyed
pseudonym in the shards like every identifier), ``val`` another, ``test`` a third, so
``study_id`` recovers the split without a schema change.

Tasks are chunks of one split, read row-range by row-range from the zip member, so neither discovery
nor loading holds a whole 224-px data set in memory.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ctssl_base.errors import UserError
from data_prep.hu import resize_square
from data_prep.records import Reject, SeriesData, SeriesTask, SliceData
from data_prep.sources.base import SOURCES, PrepOptions, Source

SPLITS = ("train", "val", "test")
CHUNK_IMAGES = 2048
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's convert("L")


def _member_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, header length) of ``key.npy`` without reading its data."""
    with zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(shape), np.dtype(dtype), bool(fortran), f.tell()


def read_rows(path: str, key: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of array ``key`` of an .npz, reading only those bytes (after decompression)."""
    with zipfile.ZipFile(path) as zf:
        shape, dtype, fortran, offset = _member_header(zf, key)
        if fortran or dtype.hasobject:
            with np.load(path, allow_pickle=False) as z:
                return np.asarray(z[key][start:stop])
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        with zf.open(f"{key}.npy") as f:
            f.seek(offset + start * row)
            buf = f.read((stop - start) * row)
        if len(buf) != (stop - start) * row:
            raise ValueError(f"{key}: array data is truncated")
        return np.frombuffer(buf, dtype=dtype).reshape((stop - start, *shape[1:]))


def _npz_files(root: str) -> list[str]:
    if os.path.isfile(root):
        return [root]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(".npz"))


def to_gray8(img: np.ndarray) -> np.ndarray:
    """One image (H, W) or (H, W, 3|4) of 0..255 values -> (H, W) int16 0..255."""
    if img.ndim == 3:
        img = img[..., :3].astype(np.float32) @ _LUMA
    return np.clip(np.rint(img), 0, 255).astype(np.int16)


@SOURCES.register("medmnist")
class MedMNISTSource(Source):
    intensity = "gray8"

    @classmethod
    def detect(cls, root: str) -> bool:
        if os.path.isfile(root):
            return root.lower().endswith(".npz")
        if not os.path.isdir(root):
            return False
        names = [f for _, _, fs in os.walk(root) for f in fs if not f.startswith(".")]
        return bool(names) and any(n.lower().endswith(".npz") for n in names) and not any(
            n.lower().endswith((".dcm", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg")) for n in names)

    def discover(self, root: str, opts: PrepOptions) -> tuple[list[SeriesTask], list[Reject]]:
        if not os.path.exists(root):
            raise UserError(f"{root}: input does not exist")
        if opts.labels_csv:
            raise UserError("MedMNIST .npz files carry their own labels; drop --labels")
        base = root if os.path.isdir(root) else os.path.dirname(root)
        self.ignored = [] if os.path.isfile(root) else sorted(
            os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(root) for f in fs
            if not f.lower().endswith(".npz") and not f.startswith("."))
        tasks: list[SeriesTask] = []
        rejects: list[Reject] = []
        for path in _npz_files(root):
            rel = os.path.relpath(path, base)
            try:
                with zipfile.ZipFile(path) as zf:
                    members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
                    found = [s for s in SPLITS if f"{s}_images" in members]
                    if not found:
                        rejects.append(Reject(rel, "no train_images / val_images / test_images arrays; not a "
                                                   f"MedMNIST file (arrays: {', '.join(sorted(members)) or 'none'})"))
                        continue
                    for split in found:
                        ishape, idtype, _, _ = _member_header(zf, f"{split}_images")
                        if f"{split}_labels" not in members:
                            rejects.append(Reject(f"{rel}:{split}", f"{split}_images has no {split}_labels array"))
                            continue
                        lshape, _, _, _ = _member_header(zf, f"{split}_labels")
                        why = self._bad_shape(ishape, idtype, lshape, split)
                        if why:
                            rejects.append(Reject(f"{rel}:{split}", why))
                            continue
                        for start in range(0, ishape[0], CHUNK_IMAGES):
                            stop = min(start + CHUNK_IMAGES, ishape[0])
                            tasks.append(SeriesTask(
                                source=self.name, key=f"medmnist:{rel}:{split}:{start}",
                                inputs=[f"{rel}:{split}:{i}" for i in range(start, stop)],
                                options={"base": base, "path": path, "rel": rel, "split": split,
                                         "start": start, "stop": stop,
                                         "volume": len(ishape) == 4 and ishape[3] not in (3, 4)}))
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                rejects.append(Reject(rel, f"unreadable .npz file ({type(e).__name__}: {str(e)[:160]})"))
        return tasks, rejects

    @staticmethod
    def _bad_shape(ishape: tuple[int, ...], idtype: np.dtype, lshape: tuple[int, ...], split: str) -> str:
        if len(ishape) not in (3, 4):
            return f"{split}_images has shape {ishape}; expected (N, H, W), (N, H, W, 3) or (N, D, H, W)"
        if idtype.kind not in "uif":
            return f"{split}_images has dtype {idtype}; expected 8-bit integers"
        if not lshape or lshape[0] != ishape[0]:
            return f"{split}_labels has {lshape[0] if lshape else 0} rows but {split}_images has {ishape[0]}"
        return ""

    def count_slices(self, task: SeriesTask) -> int:
        return len(task.inputs)

    def load(self, task: SeriesTask, opts: PrepOptions) -> SeriesData:
        series = self.load_many(task, opts)
        if len(series) != 1:
            raise UserError(f"{task.key}: holds {len(series)} images; use load_many")
        return series[0]

    def load_many(self, task: SeriesTask, opts: PrepOptions) -> list[SeriesData]:
        o = task.options
        rel, split, start, stop = o["rel"], o["split"], o["start"], o["stop"]
        try:
            images = read_rows(o["path"], f"{split}_images", start, stop)
            labels = read_rows(o["path"], f"{split}_labels", start, stop)
        except Exception as e:  # noqa: BLE001 - corrupt zip members raise zlib / value errors
            raise UserError(f"{rel}: {split} rows {start}..{stop - 1} unreadable ({type(e).__name__}: {e})") from e
        labels = labels.reshape(len(labels), -1)
        dataset = opts.dataset or self.name
        out: list[SeriesData] = []
        bad: list[Reject] = []
        for j in range(stop - start):
            i = start + j
            name = f"{rel}:{split}:{i}"
            img = images[j]
            if img.dtype.kind == "f" and not np.isfinite(img).all():
                bad.append(Reject(name, "image has NaN or infinite values"))
                continue
            if img.min() < 0 or img.max() > 255:
                bad.append(Reject(name, f"values {img.min()}..{img.max()} outside 0..255 (not an 8-bit image)"))
                continue
            label = ",".join(str(int(v)) for v in labels[j])
            data = SeriesData(source=self.name, dataset=dataset, patient=name, study=f"{rel}:{split}", series=name,
                              split=split)
            planes = img if o["volume"] else img[None]
            for k, plane in enumerate(planes):
                g, _ = resize_square(to_gray8(plane), opts.size, pad_value=0)
                data.slices.append(SliceData(hu=g, slice_index=k, z_mm=float("nan"),
                                             spacing_mm=(float("nan"), float("nan")), label=label,
                                             input=name if not o["volume"] else f"{name}#z{k}"))
            out.append(data)
        if bad:
            # rejects ride on an identity-free carrier: attached to an image's series, the prep would
            # redact that image's name from them (and the names of files that share its prefix)
            out.append(SeriesData(source=self.name, dataset=dataset, patient="", study="", series="", rejects=bad))
        return out
