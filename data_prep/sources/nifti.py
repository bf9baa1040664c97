"""NIfTI CT volumes (``.nii`` / ``.nii.gz``, e.g. TotalSegmentator or MSD) -> axial HU slices.

One file is one series. The volume is brought to the closest canonical (RAS+) orientation first, so
"axial" and "ordered along z" come from the affine and not from how the file happens to store its
axes; slices are then shown the way DICOM viewers show CT (rows anterior -> posterior, columns patient
right -> left) so that NIfTI and DICOM inputs of the same patient give the same pictures. Voxel values
are taken as HU (the convention of CT NIfTI sets; the header's scl_slope/scl_inter are applied).

Patient: the file's path without the extension, or its folder when the file has a generic name
(``s0001/ct.nii.gz`` -> ``s0001``), so that several volumes in one patient folder share a patient.
"""

from __future__ import annotations

import os

import numpy as np

from ctssl_base.errors import UserError
from data_prep.hu import resize_square, to_hu
from data_prep.labels import label_for, labels_for_input
from data_prep.records import Reject, SeriesData, SeriesTask, SliceData
from data_prep.sources.base import SOURCES, PrepOptions, Source

SUFFIXES = (".nii.gz", ".nii")
GENERIC_STEMS = {"ct", "image", "img", "volume", "vol", "scan", "data", "imaging"}


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for s in SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _walk(root: str) -> list[str]:
    if os.path.isfile(root):
        return [root]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
    return out


def _canonical_raw(img) -> tuple[np.ndarray, np.ndarray, float, float]:  # noqa: ANN001 - nibabel image
    """(stored voxels reoriented to RAS+ as a view, the matching affine, scl_slope, scl_inter).

    nibabel's own ``as_closest_canonical`` would materialise the scaled volume (float64 when the header
    has a slope: 8 bytes a voxel); keeping the stored dtype and scaling slice by slice bounds memory.
    """
    import nibabel as nib

    proxy = img.dataobj
    if hasattr(proxy, "get_unscaled"):
        raw = np.asanyarray(proxy.get_unscaled())
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    else:
        raw, slope, inter = np.asanyarray(proxy), 1.0, 0.0
    if not np.isfinite(slope) or slope == 0:
        slope = 1.0
    if not np.isfinite(inter):
        inter = 0.0
    ornt = nib.orientations.io_orientation(img.affine)
    if raw.ndim >= 3:
        raw3 = nib.orientations.apply_orientation(raw, ornt)
        affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, raw.shape[:3])
        return raw3, affine, slope, inter
    return raw, img.affine, slope, inter


def _not_a_ct_volume(vol: np.ndarray) -> str | None:
    """Why ``vol`` is not one scalar CT volume (a reject reason), or None when it is.

    Accepted: a 3-D volume of integers, floats or booleans, a 2-D image (one slice) and 4-D/5-D files
    whose axes after the third are all of length 1 (one volume saved with a time axis). Colour (RGB,
    RGBA: structured voxels), complex voxels and several volumes in one file are not CT in HU; each is
    one reject so that the run goes on with the other files.
    """
    dt = vol.dtype
    if dt.fields is not None:
        kind = {3: "RGB", 4: "RGBA"}.get(len(dt.fields), f"{len(dt.fields)}-channel")
        return f"{kind} colour voxels ({', '.join(dt.names)}); expected one value per voxel (a CT volume in HU)"
    if dt.kind == "c":
        return f"complex voxels ({dt.name}); expected one real value per voxel (a CT volume in HU)"
    if dt.kind not in "biuf":
        return f"voxels of type {dt}; expected integer or float values (a CT volume in HU)"
    if vol.ndim < 2:
        return f"a {vol.ndim}-D image of shape {vol.shape}; expected one 3-D CT volume"
    if vol.ndim > 3 and any(n != 1 for n in vol.shape[3:]):
        volumes = int(np.prod(vol.shape[3:]))
        return (f"a {vol.ndim}-D image of shape {vol.shape} ({volumes} volumes); expected one 3-D CT volume "
                "(split it into one file per volume)")
    return None


def patient_of(rel: str) -> str:
    stem = _stem(rel)
    parent = os.path.dirname(rel)
    if stem.lower() in GENERIC_STEMS and parent:
        return parent.replace(os.sep, "/")
    return os.path.join(parent, stem).replace(os.sep, "/")


@SOURCES.register("nifti")
class NiftiSource(Source):
    @classmethod
    def detect(cls, root: str) -> bool:
        if os.path.isfile(root):
            return root.lower().endswith(SUFFIXES)
        return any(p.lower().endswith(SUFFIXES) for p in _walk(root)[:500])

    def discover(self, root: str, opts: PrepOptions) -> tuple[list[SeriesTask], list[Reject]]:
        if not os.path.exists(root):
            raise UserError(f"{root}: input does not exist")
        base = root if os.path.isdir(root) else os.path.dirname(root)
        self.ignored = []
        files = []
        for p in _walk(root):
            (files if p.lower().endswith(SUFFIXES) else self.ignored).append(p)
        self.ignored = [os.path.relpath(p, base) for p in self.ignored]
        rejects: list[Reject] = []
        present = {os.path.relpath(p, base) for p in files}
        labels = labels_for_input(opts.labels_csv, base, present, rejects) if opts.labels_csv else None
        tasks = []
        for p in files:
            rel = os.path.relpath(p, base)
            lab = None
            if labels is not None:
                lab = label_for(labels, rel)
            tasks.append(SeriesTask(source=self.name, key=f"nifti:{rel}", inputs=[p],
                                    options={"base": base, "rel": rel, "label": lab}))
        return tasks, rejects

    def count_slices(self, task: SeriesTask) -> int:
        """Slices along z, from the header only (no voxel data read)."""
        import nibabel as nib

        try:
            img = nib.load(task.inputs[0])
            ornt = nib.orientations.io_orientation(img.affine)
            return int(img.shape[int(ornt[2, 0])]) if len(img.shape) >= 3 else 1
        except Exception:  # noqa: BLE001 - a broken file is reported by load(); 1 keeps the bar going
            return 1

    def load(self, task: SeriesTask, opts: PrepOptions) -> SeriesData:
        import nibabel as nib

        rel = task.options["rel"]
        # a rejected volume is reported on an identity-free record so that the reject keeps the file
        # name (the prep redacts a series' identifiers, here derived from that name, from its rejects)
        data = SeriesData(source=self.name, dataset=opts.dataset or self.name, patient="", study="", series="")
        try:
            img = nib.load(task.inputs[0])
            vol, affine, slope, inter = _canonical_raw(img)
        except Exception as e:  # noqa: BLE001 - truncated gzip, bad header... many error types
            msg = str(e).replace("\n", " ")[:160]
            data.rejects.append(Reject(rel, f"unreadable NIfTI file ({type(e).__name__}: {msg})"))
            return data
        why = _not_a_ct_volume(vol)
        if why:
            data.rejects.append(Reject(rel, why))
            return data
        while vol.ndim > 3:  # 4-D/5-D with trailing axes of length 1: one volume (checked above)
            vol = vol[..., 0]
        if vol.ndim == 2:
            vol = vol[..., None]
        if vol.dtype.kind not in "iub":
            bad = int(np.count_nonzero(~np.isfinite(vol)))
            if bad:
                data.rejects.append(Reject(rel, f"{bad} of {vol.size} voxels are NaN or infinite; "
                                                "the volume is not written"))
                return data
        data.patient = data.study = patient_of(rel)
        data.series = rel
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        spacing = (float(zooms[1]), float(zooms[0]))  # rows run along y, columns along x
        # canonical: voxel axis 2 increases towards superior, so index order is order along z
        cx, cy = (vol.shape[0] - 1) / 2.0, (vol.shape[1] - 1) / 2.0
        zs = affine[2, 0] * cx + affine[2, 1] * cy + affine[2, 2] * np.arange(vol.shape[2]) + affine[2, 3]
        for k in range(vol.shape[2]):
            sl = np.asarray(vol[::-1, ::-1, k]).T  # rows anterior->posterior, columns right->left
            hu = to_hu(np.ascontiguousarray(sl), slope, inter)
            hu, factors = resize_square(hu, opts.size, pad_value=opts.pad_hu)
            data.slices.append(SliceData(hu=hu, slice_index=k, z_mm=float(zs[k]),
                                         spacing_mm=(spacing[0] * factors[0], spacing[1] * factors[1]),
                                         label=task.options.get("label"), input=f"{rel}#z{k}"))
        return data
