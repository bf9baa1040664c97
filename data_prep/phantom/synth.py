"""A deterministic synthetic CT phantom of the human trunk, rendered slice by slice in HU.

Why a phantom: the demo and the tests need CT-like data that ships with the code (no downloads),
carries labels for downstream tasks, and is hard enough that self-supervised pre-training visibly
helps when few labels exist. So the anatomy is plausible rather than decorative:

* every slice is a cut at depth ``d`` (mm below the lung apex) through one patient whose body size,
  shape, organ extents, positions and tissue densities are drawn per patient;
* the region class of a slice (``REGION_CLASSES``) follows anatomical landmarks along ``d`` (top of
  the heart, bottom of the heart, top/bottom of the kidneys, iliac crest), so it is something an
  encoder must learn from the image content, like OrganSMNIST's organ classes;
* lesions are 3-D spheres (lung nodules, solid or ground glass; hypo-dense liver lesions; kidney
  cysts) of 3-16 mm radius with contrasts from obvious to subtle, among lung vessels that look like
  small nodules and under 10-20 HU of correlated noise: learnable, not trivial.

Rendering is vectorised numpy on bounding-box windows (a 256x256 slice takes about 2 ms), and every
random draw comes from generators seeded by (seed, patient, slice), so a slice is the same whatever
order or subset is rendered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

REGION_CLASSES: tuple[str, ...] = ("lung", "heart", "liver", "kidney", "bowel", "pelvis")
"""Slice region classes, top to bottom. Boundaries: top of the heart, bottom of the heart, top of the
kidneys, bottom of the kidneys, iliac crest."""

LESION_VISIBLE_MM = 2.5
"""A slice counts as showing a lesion when the lesion's cross-section radius there is at least this."""

AIR_HU = -1000


class Tissue(IntEnum):
    """Tissue label of a rendered pixel (ground truth for tests, not written to DICOM)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    BLOOD = 4  # heart chambers, aorta, IVC, lung vessels
    LIVER = 5
    SPLEEN = 6
    KIDNEY = 7
    CORTICAL = 8  # cortical bone
    MARROW = 9  # cancellous bone
    BOWEL = 10
    GAS = 11
    BLADDER = 12
    SOFT = 13  # mediastinal soft tissue
    CANAL = 14  # spinal canal
    TABLE = 15
    LESION = 16


TISSUE_HU: dict[Tissue, tuple[float, float]] = {
    # per-patient range of the noise-free value of each tissue
    Tissue.AIR: (-1000.0, -1000.0),
    Tissue.FAT: (-115.0, -85.0),
    Tissue.MUSCLE: (40.0, 60.0),
    Tissue.LUNG: (-880.0, -820.0),
    Tissue.BLOOD: (35.0, 50.0),
    Tissue.LIVER: (50.0, 70.0),
    Tissue.SPLEEN: (40.0, 52.0),
    Tissue.KIDNEY: (25.0, 38.0),
    Tissue.CORTICAL: (700.0, 1200.0),
    Tissue.MARROW: (300.0, 420.0),
    Tissue.BOWEL: (15.0, 40.0),
    Tissue.GAS: (-1000.0, -950.0),
    Tissue.BLADDER: (0.0, 15.0),
    Tissue.SOFT: (-30.0, 20.0),
    Tissue.CANAL: (10.0, 25.0),
    Tissue.TABLE: (-450.0, -250.0),
}

# lesion sites: tissue -> (radius range mm, kind)
_LESION_RADIUS = {Tissue.LUNG: (3.0, 12.0), Tissue.LIVER: (5.0, 16.0), Tissue.KIDNEY: (4.0, 10.0)}
_LESION_SITE_WEIGHT = {Tissue.LUNG: 0.55, Tissue.LIVER: 0.35, Tissue.KIDNEY: 0.10}


@dataclass(frozen=True)
class Lesion:
    site: Tissue
    d_mm: float  # centre depth below the apex
    x_mm: float  # centre relative to the body centre (+x = patient left)
    y_mm: float  # (+y = posterior)
    radius_mm: float
    hu: float

    def radius_at(self, d: float | np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(self.radius_mm**2 - (np.asarray(d, dtype=np.float64) - self.d_mm) ** 2, 0.0))


@dataclass
class Anatomy:
    """Everything that varies between phantom patients (mm, HU)."""

    fov_mm: float
    cx: float  # body centre offset from the image centre
    cy: float
    knots_d: np.ndarray  # body outline along depth
    knots_a: np.ndarray  # left-right semi-axis
    knots_b: np.ndarray  # anterior semi-axis (posterior is 0.92x: the patient lies on the table)
    knots_fat: np.ndarray  # subcutaneous fat thickness
    wall: tuple[float, float, float]  # muscle wall: anterior, lateral, posterior
    landmarks: dict[str, float]
    hu: dict[Tissue, float]
    noise_sd: float
    vertebra_r: float
    rib_period: float
    rib_phase: float
    rib_drop: float
    bowel_waves: np.ndarray  # (k, 4): kx, ky, kd, phase
    vessels: np.ndarray  # (n, 8): x0, y0, d0, x1, y1, d1, r0, r1
    organ_jitter: np.ndarray  # (12, 2) small per-organ position offsets (mm)
    lesions: list[Lesion] = field(default_factory=list)

    def region_bounds(self) -> np.ndarray:
        lm = self.landmarks
        return np.array([lm["heart_top"], lm["heart_bottom"], lm["kidney_top"], lm["kidney_bottom"],
                         lm["pelvis_top"]])

    def region_index(self, d: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.region_bounds(), np.asarray(d), side="right")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def sample_anatomy(seed: int) -> Anatomy:
    """Draw one patient's anatomy (no lesions yet) from ``seed``."""
    rng = _rng(seed, 0xA7A7)
    sz = rng.uniform(0.9, 1.1)  # height
    sw = rng.uniform(0.82, 1.18)  # girth
    ap = rng.uniform(0.88, 1.1)
    base = {"heart_top": 95, "heart_bottom": 185, "liver_top": 168, "lung_base": 240, "liver_bottom": 340,
            "kidney_top": 270, "kidney_bottom": 380, "pelvis_top": 440, "pelvis_end": 585}
    lm = {k: v * sz * rng.uniform(0.96, 1.04) for k, v in base.items()}
    lm["heart_top"] = min(lm["heart_top"], lm["heart_bottom"] - 60)
    lm["kidney_bottom"] = max(lm["kidney_bottom"], lm["kidney_top"] + 80)
    lm["pelvis_top"] = max(lm["pelvis_top"], lm["kidney_bottom"] + 40)
    knots_d = np.array([-20.0, 60, 185, 300, 440, 600]) * sz
    knots_a = np.array([135.0, 158, 165, 155, 165, 170]) * sw * rng.uniform(0.95, 1.05, 6)
    knots_b = np.array([92.0, 108, 115, 112, 110, 104]) * sw * ap * rng.uniform(0.95, 1.05, 6)
    fat0 = rng.uniform(6.0, 28.0) * sw
    knots_fat = fat0 * np.array([0.6, 0.7, 0.8, 1.25, 1.35, 1.15])
    fov = float(2.0 * knots_a.max() * rng.uniform(1.12, 1.3))
    hu = {t: float(rng.uniform(*r)) for t, r in TISSUE_HU.items()}
    # lung vessels: three generations of straight segments fanning out from each hilum
    vessels = []
    a_t, b_t = 0.7 * knots_a[2], 0.7 * knots_b[2]
    d_h = 0.5 * (lm["heart_top"] + lm["heart_bottom"]) - 15
    for side in (-1, 1):
        hx, hy = side * 0.3 * a_t, 0.05 * b_t
        for _ in range(10):
            direc = np.array([side * rng.uniform(0.2, 1.0), rng.uniform(-0.6, 0.8), rng.uniform(-1.0, 1.0)])
            direc[2] = math.copysign(max(abs(direc[2]), 0.45), direc[2])
            direc /= np.linalg.norm(direc)
            p0 = np.array([hx, hy, d_h])
            p1 = p0 + direc * rng.uniform(60, 110) * sz
            vessels.append([*p0, *p1, rng.uniform(3.5, 5.0), 2.2])
            for _ in range(4):
                q0 = p0 + (p1 - p0) * rng.uniform(0.4, 1.0)
                d2 = direc + rng.normal(0, 0.5, 3)
                d2[2] = math.copysign(max(abs(d2[2]), 0.4), d2[2])
                d2 /= np.linalg.norm(d2)
                q1 = q0 + d2 * rng.uniform(30, 70)
                vessels.append([*q0, *q1, 2.2, 1.1])
                for _ in range(2):
                    s0 = q0 + (q1 - q0) * rng.uniform(0.5, 1.0)
                    d3 = d2 + rng.normal(0, 0.6, 3)
                    d3[2] = math.copysign(max(abs(d3[2]), 0.4), d3[2])
                    d3 /= np.linalg.norm(d3)
                    vessels.append([*s0, *(s0 + d3 * rng.uniform(20, 45)), 1.2, 0.6])
    return Anatomy(
        fov_mm=fov,
        cx=float(rng.uniform(-0.04, 0.04) * fov),
        cy=float(rng.uniform(-0.06, 0.02) * fov),
        knots_d=knots_d, knots_a=knots_a, knots_b=knots_b, knots_fat=knots_fat,
        wall=(rng.uniform(8, 14), rng.uniform(10, 16), rng.uniform(30, 42)),
        landmarks=lm, hu=hu, noise_sd=float(rng.uniform(10.0, 20.0)),
        vertebra_r=float(rng.uniform(15, 20) * sw**0.5),
        rib_period=float(rng.uniform(23, 28) * sz), rib_phase=float(rng.uniform(0, 25)),
        rib_drop=float(rng.uniform(50, 75)),
        bowel_waves=np.column_stack([rng.normal(0, 0.09, 6), rng.normal(0, 0.09, 6),
                                     rng.normal(0, 0.05, 6), rng.uniform(0, 2 * np.pi, 6)]),
        vessels=np.asarray(vessels, dtype=np.float64),
        organ_jitter=rng.normal(0, 4.0, (12, 2)),
    )


def _ramp(d: float, lo: float, hi: float) -> float:
    """0 outside [lo, hi], a smooth bump (sine) inside."""
    if d <= lo or d >= hi:
        return 0.0
    return math.sin(math.pi * (d - lo) / (hi - lo))


class _Canvas:
    """One slice being painted: HU (float32) + tissue labels, with windowed ellipse helpers."""

    def __init__(self, anat: Anatomy, size: int):
        self.anat = anat
        self.size = size
        self.px = anat.fov_mm / size
        c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * np.float32(self.px)
        self.x = c - np.float32(anat.cx)  # columns, relative to the body centre
        self.y = c - np.float32(anat.cy)  # rows
        self.img = np.full((size, size), AIR_HU, dtype=np.float32)
        self.tis = np.zeros((size, size), dtype=np.uint8)

    def window(self, cx: float, cy: float, r: float) -> tuple[slice, slice] | None:
        px, n = self.px, self.size
        c0 = int(math.floor((cx - r + self.anat.cx) / px + (n - 1) / 2.0))
        c1 = int(math.ceil((cx + r + self.anat.cx) / px + (n - 1) / 2.0)) + 1
        r0 = int(math.floor((cy - r + self.anat.cy) / px + (n - 1) / 2.0))
        r1 = int(math.ceil((cy + r + self.anat.cy) / px + (n - 1) / 2.0)) + 1
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, n), min(r1, n)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(self, cx: float, cy: float, ax: float, by: float, ang_deg: float = 0.0):
        """(window, normalised radius^2) of an ellipse, or None when it is empty or off-image."""
        if ax <= 0.3 or by <= 0.3:
            return None
        w = self.window(cx, cy, max(ax, by))
        if w is None:
            return None
        dx = self.x[w[1]][None, :] - np.float32(cx)
        dy = self.y[w[0]][:, None] - np.float32(cy)
        if ang_deg:
            t = math.radians(ang_deg)
            ct, st = np.float32(math.cos(t)), np.float32(math.sin(t))
            u = dx * ct + dy * st
            v = dy * ct - dx * st
        else:
            u, v = np.broadcast_arrays(dx, dy)
        q = (u / np.float32(ax)) ** 2 + (v / np.float32(by)) ** 2
        return w, q, u, v

    def paint(self, w, mask: np.ndarray, tissue: Tissue, hu: float | None = None) -> None:
        value = self.anat.hu[tissue] if hu is None else hu
        self.img[w][mask] = value
        self.tis[w][mask] = tissue

    def fill_ellipse(self, cx, cy, ax, by, tissue: Tissue, ang_deg=0.0, within: np.ndarray | None = None,
                     hu: float | None = None):
        e = self.ellipse(cx, cy, ax, by, ang_deg)
        if e is None:
            return None
        w, q, u, v = e
        m = q < 1
        if within is not None:
            m &= within[w]
        self.paint(w, m, tissue, hu)
        return e

    def soft_disc(self, cx: float, cy: float, r: float, hu: float, tissue: Tissue,
                  only: tuple[int, ...] | None = None) -> None:
        """A disc with a one-pixel anti-aliased rim, so that sub-pixel vessels and small lesions still
        show as partial-volume intensity at low resolutions."""
        w = self.window(cx, cy, r + self.px)
        if w is None:
            return
        dx = self.x[w[1]][None, :] - np.float32(cx)
        dy = self.y[w[0]][:, None] - np.float32(cy)
        cover = np.clip((np.float32(r) - np.sqrt(dx * dx + dy * dy)) / np.float32(self.px) + 0.5, 0, 1)
        if only is not None:
            tw = self.tis[w]
            allowed = tw == only[0]
            for t in only[1:]:
                allowed |= tw == t
            cover *= allowed
        sub = self.img[w]
        sub += cover * (np.float32(hu) - sub)
        self.tis[w][cover >= 0.5] = tissue


def _body_axes(anat: Anatomy, d: float) -> tuple[float, float, float, float]:
    a = float(np.interp(d, anat.knots_d, anat.knots_a))
    b = float(np.interp(d, anat.knots_d, anat.knots_b))
    fat = float(np.interp(d, anat.knots_d, anat.knots_fat))
    return a, b, 0.92 * b, fat


def _render_clean(anat: Anatomy, d: float, size: int, lesions: bool = True) -> _Canvas:
    cv = _Canvas(anat, size)
    lm, H = anat.landmarks, anat.hu
    a, b_ant, b_post, fat = _body_axes(anat, d)
    x2 = (cv.x * cv.x)[None, :]
    y2 = (cv.y * cv.y)[:, None]
    post = (cv.y > 0)[:, None]

    def rho(ax: float, ba: float, bp: float) -> np.ndarray:
        return x2 / np.float32(ax * ax) + y2 * np.where(post, np.float32(1 / (bp * bp)), np.float32(1 / (ba * ba)))

    # table under the patient
    t0 = b_post + 6.0
    rows = (cv.y >= t0) & (cv.y < t0 + 10.0)
    cv.img[rows, :] = H[Tissue.TABLE]
    cv.tis[rows, :] = Tissue.TABLE
    body = rho(a, b_ant, b_post) < 1
    cv.img[body] = H[Tissue.FAT]
    cv.tis[body] = Tissue.FAT
    wa, wl, wp = anat.wall
    muscle = rho(a - fat, b_ant - fat, b_post - fat) < 1
    cv.img[muscle] = H[Tissue.MUSCLE]
    cv.tis[muscle] = Tissue.MUSCLE
    ca, cba, cbp = a - fat - wl, b_ant - fat - wa, b_post - fat - wp
    cav_rho = rho(ca, cba, cbp)
    cavity = cav_rho < 1
    thorax = d < lm["heart_bottom"] + 5
    if thorax:
        cv.img[cavity] = H[Tissue.SOFT]
        cv.tis[cavity] = Tissue.SOFT
    else:
        cv.img[cavity] = H[Tissue.FAT]
        cv.tis[cavity] = Tissue.FAT
    j = anat.organ_jitter
    vr = anat.vertebra_r * (1.0 + 0.35 * min(max((d - lm["heart_bottom"]) / 250.0, 0.0), 1.0))
    y_vb = cbp - 0.9 * vr  # vertebral body centre

    # abdominal contents: bowel loops with some gas, from a per-patient low-frequency field
    if d > lm["heart_bottom"] + 15:
        e = cv.ellipse(0.0, 0.0, ca, max(cba, cbp))
        if e is not None:
            w, _, u, v = e
            f = np.zeros(u.shape, dtype=np.float32)
            for kx, ky, kd, ph in anat.bowel_waves:
                f += np.cos(np.float32(kx) * u + np.float32(ky) * v + np.float32(kd * d + ph))
            inside = cavity[w]
            bowel = inside & (f > 0.4)
            cv.paint(w, bowel, Tissue.BOWEL)
            cv.paint(w, inside & (f > 2.3), Tissue.GAS)

    # lungs (shrinking towards the bases, posterior recesses last), heart in between
    for side, base in ((-1, lm["lung_base"] - 15), (1, lm["lung_base"])):
        if 0 < d < base:
            grow = min(1.0, math.sqrt(d / (0.35 * base)))
            shrink = min(1.0, max(0.0, (base - d) / (base - lm["heart_bottom"] + 30)))
            f = grow * (0.35 + 0.65 * shrink)
            lx = side * (0.47 * ca) + j[0, 0]
            ly = (0.05 + 0.45 * (1 - shrink)) * cbp + j[0, 1]
            cv.fill_ellipse(lx, ly, 0.5 * ca * f, 0.9 * max(cba, cbp) * (0.4 + 0.6 * f), Tissue.LUNG,
                            ang_deg=side * 8.0, within=cavity)
    h = _ramp(d, lm["heart_top"], lm["heart_bottom"])
    if h > 0:
        h = math.sqrt(h)
        cv.fill_ellipse(0.12 * ca + j[1, 0], -0.28 * cba + j[1, 1], 0.42 * ca * h, 0.5 * cba * h, Tissue.BLOOD,
                        ang_deg=-30.0, within=cavity)
    # liver (right = image left), with the left lobe crossing the midline in its upper part
    ll = _ramp(d, lm["liver_top"] - 40, lm["liver_bottom"])
    if ll > 0:
        u = (d - lm["liver_top"]) / (lm["liver_bottom"] - lm["liver_top"])
        s = ll ** 0.5 * (1.0 if u < 0.5 else 1.0 - 0.6 * (u - 0.5))
        cv.fill_ellipse(-0.42 * ca + j[2, 0], 0.02 * cba + j[2, 1], 0.58 * ca * s, 0.82 * cba * s,
                        Tissue.LIVER, ang_deg=-15.0, within=cavity)
        if u < 0.45:
            cv.fill_ellipse(0.02 * ca + j[3, 0], -0.5 * cba + j[3, 1], 0.38 * ca * s, 0.28 * cba * s,
                            Tissue.LIVER, within=cavity)
    sp = _ramp(d, lm["liver_top"] + 15, lm["kidney_top"] + 50)
    if sp > 0:
        cv.fill_ellipse(0.62 * ca + j[4, 0], 0.35 * cbp + j[4, 1], 0.2 * ca * sp ** 0.5, 0.32 * cbp * sp ** 0.5,
                        Tissue.SPLEEN, ang_deg=40.0, within=cavity)
    st = _ramp(d, lm["heart_bottom"] - 5, lm["kidney_top"] + 25)
    if st > 0:
        e = cv.fill_ellipse(0.38 * ca + j[5, 0], -0.3 * cba + j[5, 1], 0.3 * ca * st, 0.28 * cba * st,
                            Tissue.BOWEL, within=cavity)
        if e is not None:
            w, q, _, v = e
            cv.paint(w, (q < 0.8) & (v < -0.35 * 0.28 * cba * st) & cavity[w], Tissue.GAS)
    # kidneys with renal sinus fat; the left one sits a little higher
    for side, lo, hi in ((-1, lm["kidney_top"] + 10, lm["kidney_bottom"]),
                         (1, lm["kidney_top"], lm["kidney_bottom"] - 10)):
        k = _ramp(d, lo, hi)
        if k > 0:
            k = k ** 0.5
            kx, ky = side * (vr + 45) + j[6, 0], y_vb - 8 + j[6, 1]
            cv.fill_ellipse(kx, ky, 30 * k, 21 * k, Tissue.KIDNEY, ang_deg=-side * 35.0, within=cavity)
            if k > 0.75:
                cv.fill_ellipse(kx - side * 6, ky - 3, 11 * (k - 0.5), 7 * (k - 0.5), Tissue.FAT,
                                ang_deg=-side * 35.0)
    # psoas muscles alongside the lumbar spine
    ps = min(max((d - lm["kidney_top"] - 20) / 180.0, 0.0), 1.0)
    if ps > 0 and d < lm["pelvis_end"] - 60:
        for side in (-1, 1):
            cv.fill_ellipse(side * (vr + 14), y_vb - 2, 8 + 16 * ps, 9 + 13 * ps, Tissue.MUSCLE)
    # great vessels
    if 30 < d < lm["pelvis_top"] + 10:
        cv.fill_ellipse(0.6 * vr + j[7, 0] * 0.5, y_vb - vr - 13, 12.0, 12.0, Tissue.BLOOD)
    if lm["heart_bottom"] - 20 < d < lm["pelvis_top"]:
        cv.fill_ellipse(-0.9 * vr + j[8, 0] * 0.5, y_vb - vr - 12, 12.0, 10.0, Tissue.BLOOD)
    # pelvis: iliac wings, then the acetabula / femoral heads; the bladder fills anteriorly
    pel = lm["pelvis_top"]
    lp = lm["pelvis_end"] - pel
    if pel < d < pel + 0.6 * lp:
        g = _ramp(d, pel - 10, pel + 0.6 * lp) ** 0.5
        for side in (-1, 1):
            e = cv.fill_ellipse(side * 0.5 * ca + j[9, 0], 0.25 * cbp, 0.33 * ca * g, 13.0 * g + 3,
                                Tissue.CORTICAL, ang_deg=side * 55.0)
            if e is not None:
                w, q, _, _ = e
                cv.paint(w, q < 0.45, Tissue.MARROW)
    if d > pel + 0.62 * lp:
        for side in (-1, 1):
            e = cv.fill_ellipse(side * 0.56 * ca, 0.05 * cbp, 23.0, 23.0, Tissue.CORTICAL)
            if e is not None:
                w, q, _, _ = e
                cv.paint(w, q < 0.7, Tissue.MARROW)
    bl = _ramp(d, pel + 0.35 * lp, lm["pelvis_end"] + 40)
    if bl > 0:
        cv.fill_ellipse(j[10, 0], -0.35 * cba + j[10, 1], 0.3 * ca * bl, 0.3 * cba * bl, Tissue.BLADDER,
                        within=cavity)

    # lung vessels: intersections of the per-patient segment tree with this plane
    if d < lm["lung_base"] + 5:
        v = anat.vessels
        dd = v[:, 5] - v[:, 2]
        t = (d - v[:, 2]) / dd
        hit = (t >= 0) & (t <= 1)
        for x0, y0, x1, y1, r0, r1, tt in zip(v[hit, 0], v[hit, 1], v[hit, 3], v[hit, 4], v[hit, 6], v[hit, 7],
                                               t[hit], strict=True):
            cv.soft_disc(x0 + tt * (x1 - x0), y0 + tt * (y1 - y0), r0 + tt * (r1 - r0), H[Tissue.BLOOD],
                         Tissue.BLOOD, only=(Tissue.LUNG, Tissue.BLOOD))

    # spine: vertebral body (marrow in a cortical shell; discs between levels), canal, spinous process
    if d < pel + 0.55 * lp:
        level = ((d - anat.rib_phase) % anat.rib_period) / anat.rib_period
        disc = level > 0.82
        e = cv.fill_ellipse(0.0, y_vb, vr * (1.35 if d > pel else 1.0), vr * 0.95,
                            Tissue.MUSCLE if disc else Tissue.CORTICAL, hu=(80.0 if disc else None))
        if e is not None and not disc:
            w, q, _, _ = e
            cv.paint(w, q < 0.72, Tissue.MARROW)
        e = cv.fill_ellipse(0.0, y_vb + vr + 8, 9.0, 8.0, Tissue.CORTICAL)
        if e is not None:
            w, q, _, _ = e
            cv.paint(w, q < 0.55, Tissue.CANAL)
        if not disc:
            cv.fill_ellipse(0.0, y_vb + vr + 26, 4.0, 14.0, Tissue.CORTICAL)
            for side in (-1, 1):
                cv.fill_ellipse(side * (vr * 0.9), y_vb + vr + 6, 12.0, 4.0, Tissue.CORTICAL,
                                ang_deg=side * 20.0)
    # sternum and scapulae in the chest
    if 20 < d < lm["heart_bottom"]:
        cv.fill_ellipse(0.0, -(cba + wa * 0.5), 14.0, 6.0, Tissue.MARROW)
    if d < lm["heart_top"] + 25:
        for side in (-1, 1):
            cv.fill_ellipse(side * 0.62 * a, 0.62 * b_post, 0.3 * a, 5.0, Tissue.CORTICAL, ang_deg=-side * 28.0)
    # ribs: each rib descends from the spine to the front, so a plane cuts arcs whose angular extent
    # depends on depth; lower ribs stop short of the front (floating ribs)
    if 5 < d < lm["kidney_top"] + 25:
        band = (cav_rho >= 1.0) & (cav_rho < (1.0 + 10.0 / ca) ** 2) & body
        rr, cc = np.nonzero(band)
        if rr.size:
            ang = np.abs(np.arctan2(cv.x[cc], cv.y[rr])) / np.pi  # 0 at the spine, 1 at the sternum
            reach = 1.0 if d < lm["heart_bottom"] else max(0.3, 1.0 - 0.7 * (d - lm["heart_bottom"])
                                                          / (lm["kidney_top"] + 25 - lm["heart_bottom"]))
            phase = ((d - anat.rib_drop * ang - anat.rib_phase) % anat.rib_period) / anat.rib_period
            on = (phase < 9.0 / anat.rib_period) & (ang < reach) & (ang > 0.06)
            cv.img[rr[on], cc[on]] = 0.5 * (H[Tissue.CORTICAL] + H[Tissue.MARROW])
            cv.tis[rr[on], cc[on]] = Tissue.CORTICAL

    if lesions:
        for les in anat.lesions:
            rc = float(les.radius_at(d))
            if rc > 0.3:
                cv.soft_disc(les.x_mm, les.y_mm, rc, les.hu, Tissue.LESION)
    return cv


def _blur121(img: np.ndarray) -> np.ndarray:
    """Separable [1,2,1]/4 smoothing: partial-volume edges instead of staircase outlines."""
    out = img * np.float32(0.5)
    out[:, 1:] += img[:, :-1] * np.float32(0.25)
    out[:, :-1] += img[:, 1:] * np.float32(0.25)
    out[:, 0] += img[:, 0] * np.float32(0.25)
    out[:, -1] += img[:, -1] * np.float32(0.25)
    res = out * np.float32(0.5)
    res[1:] += out[:-1] * np.float32(0.25)
    res[:-1] += out[1:] * np.float32(0.25)
    res[0] += out[0] * np.float32(0.25)
    res[-1] += out[-1] * np.float32(0.25)
    return res


def _noise_bank(seed: int, size: int) -> np.ndarray:
    """A per-patient field of correlated unit noise, a little larger than a slice; each slice takes a
    randomly shifted and flipped crop of it (drawing fresh normals per slice cost as much as the
    anatomy)."""
    key = (seed, size)
    bank = _NOISE_CACHE.get(key)
    if bank is None:
        n = _rng(seed, 0xB4).standard_normal((2, size + _NOISE_MARGIN, size + _NOISE_MARGIN), dtype=np.float32)
        n[:, :, 1:] += np.float32(0.6) * n[:, :, :-1]  # CT noise is correlated between neighbours
        n /= np.float32(math.sqrt(1.36))
        if len(_NOISE_CACHE) > 8:
            _NOISE_CACHE.clear()
        bank = _NOISE_CACHE[key] = n
    return bank


_NOISE_MARGIN = 32
_NOISE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _finish(cv: _Canvas, noise_sd: float, bank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = _blur121(cv.img)
    n = img.shape[0]
    k, dy, dx, flip = rng.integers(0, (bank.shape[0], _NOISE_MARGIN, _NOISE_MARGIN, 4))
    crop = bank[k, dy:dy + n, dx:dx + n]
    if flip & 1:
        crop = crop[::-1]
    if flip & 2:
        crop = crop[:, ::-1]
    img += crop * np.float32(noise_sd)
    np.clip(img, -1024, 3071, out=img)
    np.rint(img, out=img)
    return img.astype(np.int16)


def _place_lesions(anat: Anatomy, depths: np.ndarray, rate: float, rng: np.random.Generator) -> None:
    """Add lesions until about ``rate`` of the given slices show one (per patient, jittered)."""
    from scipy.ndimage import distance_transform_edt

    anat.lesions = []
    if rate <= 0 or len(depths) == 0:
        return
    target = max(1, round(min(rate * rng.uniform(0.6, 1.4), 0.95) * len(depths)))
    flagged = np.zeros(len(depths), dtype=bool)
    blocked = np.zeros(len(depths), dtype=bool)
    probe = 96
    for _ in range(4 * target + 10):
        if flagged.sum() >= target:
            break
        free = np.flatnonzero(~flagged & ~blocked)
        if free.size == 0:
            break
        i = int(rng.choice(free))
        d0 = float(depths[i])
        cv = _render_clean(anat, d0, probe, lesions=False)
        sites = [t for t in _LESION_SITE_WEIGHT if (cv.tis == t).sum() > 20]
        if not sites:
            blocked[i] = True  # no lesion-bearing organ at this depth; do not draw it again
            continue
        wts = np.array([_LESION_SITE_WEIGHT[t] for t in sites])
        site = sites[int(rng.choice(len(sites), p=wts / wts.sum()))]
        lo, hi = _LESION_RADIUS[site]
        r = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        dist = distance_transform_edt(cv.tis == site) * cv.px
        cand = np.flatnonzero(dist.ravel() >= r + 1.5)
        if cand.size == 0:
            r = lo
            cand = np.flatnonzero(dist.ravel() >= r + 0.5)
            if cand.size == 0:
                continue
        k = int(rng.choice(cand))
        row, col = divmod(k, probe)
        if site is Tissue.LUNG:
            hu = rng.uniform(-80, 50) if rng.random() < 0.7 else rng.uniform(-650, -420)
        elif site is Tissue.LIVER:
            hu = anat.hu[Tissue.LIVER] - rng.uniform(18, 55)
        else:
            hu = rng.uniform(0, 12)
        les = Lesion(site, d0 + float(rng.uniform(-0.3, 0.3)) * min(r, 2.0), float(cv.x[col]), float(cv.y[row]),
                     r, float(hu))
        anat.lesions.append(les)
        flagged |= les.radius_at(depths) >= LESION_VISIBLE_MM


def _lesion_flags(anat: Anatomy, depths: np.ndarray) -> np.ndarray:
    flags = np.zeros(len(depths), dtype=bool)
    for les in anat.lesions:
        flags |= les.radius_at(depths) >= LESION_VISIBLE_MM
    return flags


@dataclass
class PhantomVolume:
    """One phantom patient's axial series, head first."""

    hu: np.ndarray  # (S, H, W) int16
    spacing_mm: tuple[float, float]  # (row, col)
    slice_thickness_mm: float
    z_mm: np.ndarray  # (S,) patient z of each slice (DICOM: +z towards the head), decreasing
    depth_mm: np.ndarray  # (S,) depth below the lung apex
    region: np.ndarray  # (S,) str, one of REGION_CLASSES
    lesion: np.ndarray  # (S,) bool
    origin_xy_mm: tuple[float, float]  # patient x, y of the top-left pixel centre
    tissue: np.ndarray | None = None  # (S, H, W) uint8 Tissue labels when asked for
    anatomy: Anatomy | None = None

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


def _coverage(anat: Anatomy, n: int, rng: np.random.Generator) -> np.ndarray:
    start = float(rng.uniform(3.0, 15.0))
    end = anat.landmarks["pelvis_end"] - float(rng.uniform(0.0, 20.0))
    if n == 1:
        return np.array([0.5 * (start + end)])
    return np.linspace(start, end, n)


class PhantomPatient:
    """The plan of one phantom series: anatomy, slice depths, lesions and labels, without pixels.

    Slices are rendered one at a time (``render(i)``), so a writer can split a long series into chunks
    across processes and still produce exactly the pixels of :func:`render_volume`.
    """

    def __init__(self, seed: int, n_slices: int, size: int = 256, lesion_rate: float = 0.3):
        if n_slices < 1 or size < 16:
            raise ValueError(f"need n_slices >= 1 and size >= 16 (got {n_slices}, {size})")
        if not 0.0 <= lesion_rate <= 1.0:
            raise ValueError(f"lesion_rate must be in [0, 1] (got {lesion_rate})")
        self.seed, self.size = seed, size
        self.anatomy = anat = sample_anatomy(seed)
        self.depth_mm = _coverage(anat, n_slices, _rng(seed, 0xC0))
        _place_lesions(anat, self.depth_mm, lesion_rate, _rng(seed, 0x1E))
        px = anat.fov_mm / size
        self.spacing_mm = (px, px)
        self.slice_thickness_mm = float(self.depth_mm[1] - self.depth_mm[0]) if n_slices > 1 else 2.5
        self.z_mm = float(_rng(seed, 0x2).uniform(-250.0, 150.0)) - self.depth_mm
        self.origin_xy_mm = (-(anat.fov_mm / 2) + px / 2, -(anat.fov_mm / 2) + px / 2)
        self.region = np.asarray(REGION_CLASSES)[anat.region_index(self.depth_mm)]
        self.lesion = _lesion_flags(anat, self.depth_mm)

    @property
    def n_slices(self) -> int:
        return len(self.depth_mm)

    def render(self, i: int, with_tissue: bool = False):
        """Slice ``i`` as int16 HU (and its uint8 tissue map when asked for)."""
        cv = _render_clean(self.anatomy, float(self.depth_mm[i]), self.size)
        hu = _finish(cv, self.anatomy.noise_sd, _noise_bank(self.seed, self.size), _rng(self.seed, 0x5E, i))
        return (hu, cv.tis) if with_tissue else hu


def render_volume(seed: int, n_slices: int, size: int = 256, lesion_rate: float = 0.3,
                  with_tissue: bool = False) -> PhantomVolume:
    """Render one patient (drawn from ``seed``) as ``n_slices`` evenly spaced axial slices covering
    lung apex to pelvis; ``lesion_rate`` is the approximate fraction of slices showing a lesion."""
    plan = PhantomPatient(seed, n_slices, size, lesion_rate)
    hu = np.empty((n_slices, size, size), dtype=np.int16)
    tis = np.empty((n_slices, size, size), dtype=np.uint8) if with_tissue else None
    for i in range(n_slices):
        if tis is not None:
            hu[i], tis[i] = plan.render(i, with_tissue=True)
        else:
            hu[i] = plan.render(i)
    return PhantomVolume(
        hu=hu, spacing_mm=plan.spacing_mm, slice_thickness_mm=plan.slice_thickness_mm, z_mm=plan.z_mm,
        depth_mm=plan.depth_mm, region=plan.region, lesion=plan.lesion, origin_xy_mm=plan.origin_xy_mm,
        tissue=tis, anatomy=plan.anatomy,
    )


@dataclass
class PhantomSlices:
    """Labelled slices in memory (for tests and quick experiments), from several phantom patients."""

    hu: np.ndarray  # (n, H, W) int16
    region: np.ndarray  # (n,) str
    lesion: np.ndarray  # (n,) bool
    patient: np.ndarray  # (n,) int
    depth_mm: np.ndarray  # (n,)


def render_slices(n: int, size: int = 64, seed: int = 0, lesion_rate: float = 0.3,
                  slices_per_patient: int = 16) -> PhantomSlices:
    """``n`` slices at random depths from ``ceil(n / slices_per_patient)`` patients."""
    n_pat = max(1, math.ceil(n / slices_per_patient))
    hu = np.empty((n, size, size), dtype=np.int16)
    region = np.empty(n, dtype=object)
    lesion = np.zeros(n, dtype=bool)
    patient = np.repeat(np.arange(n_pat), slices_per_patient)[:n]
    depth = np.empty(n)
    for p in range(n_pat):
        idx = np.flatnonzero(patient == p)
        pseed = patient_seed(seed, p)
        anat = sample_anatomy(pseed)
        rng = _rng(pseed, 0xD5)
        depths = np.sort(rng.uniform(3.0, anat.landmarks["pelvis_end"] - 10.0, idx.size))
        _place_lesions(anat, depths, lesion_rate, _rng(pseed, 0x1E))
        for k, (i, d) in enumerate(zip(idx, depths, strict=True)):
            hu[i] = _finish(_render_clean(anat, float(d), size), anat.noise_sd, _noise_bank(pseed, size),
                            _rng(pseed, 0x5E, k))
        region[idx] = np.asarray(REGION_CLASSES, dtype=object)[anat.region_index(depths)]
        lesion[idx] = _lesion_flags(anat, depths)
        depth[idx] = depths
    return PhantomSlices(hu=hu, region=region.astype(str), lesion=lesion, patient=patient, depth_mm=depth)


def patient_seed(seed: int, index: int) -> int:
    """The seed of patient ``index`` of a cohort drawn with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])
