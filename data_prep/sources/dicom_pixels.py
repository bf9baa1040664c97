"""Which decoder reads the pixel data of each DICOM transfer syntax, and one place that decodes.

pydicom 3 decodes compressed pixel data through *plugins* (pylibjpeg, gdcm, pyjpegls, pillow), each an
optional package, and picks the first one installed. ctssl instead names the plugin per transfer syntax
in :data:`SYNTAXES`, so that which library decodes an archive does not depend on what else happens to be
installed beside ctssl, and so that a file no installed plugin can read is rejected with a reason that
names its transfer syntax and the package that would read it, in full.

The plugins are chosen for their licences as much as for what they read: every one is under a
permissive licence (MIT, BSD, Apache-2.0, MIT-CMU), so that ctssl can be embedded in a closed bundle.
pylibjpeg-libjpeg (GPL-3.0) is deliberately not used; the one syntax only it reads among pydicom's
plugins, JPEG extended with 12-bit samples, is rejected with its name.

The table is also the source of the table "Supported transfer syntaxes and SOP classes" in
docs/data-format.md, and tests/data_prep/test_dicom_decoders.py decodes a file of every row marked
``tested`` through ``ctssl prep``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.pixels import get_decoder, iter_pixels, pixel_array

#: the message every reject of this module begins with (tests and users grep for it)
PREFIX = "pixel data could not be decoded"


class PixelDecodeError(ValueError):
    """Pixel data that no configured decoder reads; the message is the reject reason, complete."""


@dataclass(frozen=True)
class Syntax:
    uid: str
    name: str
    #: pydicom decoding plugins, in the order tried; () = pydicom's own decoder for native data
    plugins: tuple[str, ...]
    #: what to install for the first plugin (pip names)
    install: str
    licence: str
    lossless: bool
    #: the largest BitsStored the plugins read (JPEG extended: 8; its 12-bit form needs `beyond`)
    max_bits: int = 16
    #: the plugin that would read samples above max_bits, and why it is not there
    beyond: str = ""
    #: that plugin's pydicom name: used when the user installed it (ctssl does not, for its licence)
    beyond_plugin: str = ""
    #: a file of this syntax is decoded through `ctssl prep` by the test suite
    tested: bool = True


_NATIVE = "pydicom (NumPy)"
_PYDICOM = "MIT"
_GDCM = "python-gdcm"
_GDCM_LICENCE = "BSD-3-Clause (GDCM); the python-gdcm wheel Apache-2.0"
_OPENJPEG = "pylibjpeg + pylibjpeg-openjpeg"
_OPENJPEG_LICENCE = "MIT (OpenJPEG: BSD-2-Clause)"

#: every transfer syntax ctssl reads, with its decoder
SYNTAXES: tuple[Syntax, ...] = (
    Syntax("1.2.840.10008.1.2", "Implicit VR Little Endian", (), _NATIVE, _PYDICOM, True),
    Syntax("1.2.840.10008.1.2.1", "Explicit VR Little Endian", (), _NATIVE, _PYDICOM, True),
    Syntax("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian", (), _NATIVE, _PYDICOM, True),
    Syntax("1.2.840.10008.1.2.2", "Explicit VR Big Endian", (), _NATIVE, _PYDICOM, True),
    Syntax("1.2.840.10008.1.2.5", "RLE Lossless", ("pylibjpeg", "pydicom"), "pylibjpeg + pylibjpeg-rle", "MIT",
           True),
    Syntax("1.2.840.10008.1.2.4.50", "JPEG Baseline, 8-bit", ("pillow", "gdcm"), "pillow", "MIT-CMU", False,
           max_bits=8),
    Syntax("1.2.840.10008.1.2.4.51", "JPEG Extended, 8/12-bit", ("pillow", "gdcm"), "pillow", "MIT-CMU", False,
           max_bits=8, beyond="the pylibjpeg plugin with pylibjpeg-libjpeg (GPL-3.0), which ctssl does not install",
           beyond_plugin="pylibjpeg"),
    Syntax("1.2.840.10008.1.2.4.57", "JPEG Lossless, Process 14", ("gdcm",), _GDCM, _GDCM_LICENCE, True),
    Syntax("1.2.840.10008.1.2.4.70", "JPEG Lossless SV1, first-order prediction", ("gdcm",), _GDCM,
           _GDCM_LICENCE, True),
    Syntax("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless", ("pyjpegls", "gdcm"), "pyjpegls",
           "MIT (CharLS: BSD-3-Clause)", True),
    Syntax("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless", ("pyjpegls", "gdcm"), "pyjpegls",
           "MIT (CharLS: BSD-3-Clause)", False),
    Syntax("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless", ("pylibjpeg", "gdcm", "pillow"), _OPENJPEG,
           _OPENJPEG_LICENCE, True),
    Syntax("1.2.840.10008.1.2.4.91", "JPEG 2000", ("pylibjpeg", "gdcm", "pillow"), _OPENJPEG, _OPENJPEG_LICENCE,
           False),
    Syntax("1.2.840.10008.1.2.4.201", "HTJ2K Lossless", ("pylibjpeg",), _OPENJPEG, _OPENJPEG_LICENCE, True,
           tested=False),
    Syntax("1.2.840.10008.1.2.4.202", "HTJ2K Lossless RPCL", ("pylibjpeg",), _OPENJPEG, _OPENJPEG_LICENCE, True,
           tested=False),
    Syntax("1.2.840.10008.1.2.4.203", "HTJ2K", ("pylibjpeg",), _OPENJPEG, _OPENJPEG_LICENCE, False, tested=False),
)

BY_UID: dict[str, Syntax] = {s.uid: s for s in SYNTAXES}

#: pip names of each pydicom plugin (pylibjpeg's depend on the syntax: see Syntax.install)
PLUGIN_PACKAGES = {"gdcm": "python-gdcm", "pyjpegls": "pyjpegls", "pillow": "pillow", "pydicom": "pydicom"}


def available_plugins(uid: str) -> tuple[str, ...]:
    """The plugins pydicom can use for ``uid`` in this environment (a function, so tests can replace it)."""
    try:
        return tuple(get_decoder(uid).available_plugins)
    except NotImplementedError:
        return ()


def missing_plugins() -> list[str]:
    """The rows whose first plugin is not installed here, as ``<UID> <name>: <plugin> (pip install ...)``:
    empty in the environments ``make setup`` and infra/Dockerfile build (the image build checks it)."""
    return [f"{s.uid} {s.name}: {s.plugins[0]} (pip install {s.install})" for s in SYNTAXES
            if s.plugins and s.plugins[0] not in available_plugins(s.uid)]


def describe(uid: str) -> str:
    """``<UID> (<name>)`` of a transfer syntax, for messages."""
    row = BY_UID.get(uid)
    if row is not None:
        return f"{uid} ({row.name})"
    try:
        name = pydicom.uid.UID(uid).name
    except ValueError:
        name = ""
    return f"{uid} ({name})" if name and name != uid else uid


def plugin_for(uid: str, bits_stored: int = 16) -> str:
    """The pydicom plugin that decodes ``uid`` here ('' = pydicom's own); raises :class:`PixelDecodeError`
    with the complete reject reason when none does."""
    row = BY_UID.get(uid)
    if row is None:
        try:
            known = bool(uid) and pydicom.uid.UID(uid).is_transfer_syntax
        except ValueError:  # a private UID: pydicom cannot tell
            known = False
        what = "a transfer syntax ctssl has no decoder for" if known else "an unknown transfer syntax"
        raise PixelDecodeError(f"{PREFIX}: transfer syntax {describe(uid) or '(empty)'} is {what} "
                               "(supported: see docs/data-format.md)")
    if not row.plugins:
        return ""
    if bits_stored > row.max_bits and row.beyond:
        if row.beyond_plugin and row.beyond_plugin in available_plugins(uid):
            return row.beyond_plugin
        raise PixelDecodeError(f"{PREFIX}: transfer syntax {describe(uid)} with {bits_stored}-bit samples "
                               f"needs {row.beyond}")
    have = available_plugins(uid)
    for p in row.plugins:
        if p in have:
            return p
    raise PixelDecodeError(f"{PREFIX}: transfer syntax {describe(uid)} needs the {row.plugins[0]} plugin "
                           f"(pip install {row.install}), which is not installed")


def _bits_stored(ds: pydicom.Dataset) -> int:
    v = ds.get("BitsStored")
    try:
        return int(v) if v not in (None, "") else 16
    except (TypeError, ValueError):
        return 16


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else ""


def _failed(uid: str, plugin: str, e: Exception) -> PixelDecodeError:
    text = str(e).replace("\n", " ")
    text = text if len(text) <= 160 else text[:157] + "..."
    with_ = f" with the {plugin} plugin" if plugin else ""
    return PixelDecodeError(f"{PREFIX}: transfer syntax {describe(uid)}{with_}: {type(e).__name__}: {text}")


def decode(ds: pydicom.Dataset) -> np.ndarray:
    """The decoded pixel data of a dataset read with its pixels (a single frame: (rows, cols)).

    A dataset without a transfer syntax in its file meta (a file without meta header) is left to
    pydicom's own guess of its encoding, as ``ds.pixel_array`` does.
    """
    uid = _transfer_syntax(ds)
    if not uid:
        try:
            return ds.pixel_array
        except Exception as e:  # noqa: BLE001 - decoder errors come in many types
            raise PixelDecodeError(f"{PREFIX} (no transfer syntax in the file meta): {type(e).__name__}: "
                                   f"{str(e)[:160]}") from None
    plugin = plugin_for(uid, _bits_stored(ds))
    try:
        return pixel_array(ds, decoding_plugin=plugin)
    except Exception as e:  # noqa: BLE001 - decoder errors come in many types
        raise _failed(uid, plugin, e) from None


def iter_frames(ds: pydicom.Dataset, path: str) -> Iterator[np.ndarray]:
    """The frames of the multi-frame file at ``path`` one at a time (``ds``: its header, read without
    pixels), through the plugin of its transfer syntax. The plugin is chosen before the file is opened
    again, so a missing one is one :class:`PixelDecodeError`, raised by the first ``next``."""
    uid = _transfer_syntax(ds)
    plugin = plugin_for(uid, _bits_stored(ds)) if uid else ""
    frames = iter_pixels(path, decoding_plugin=plugin)
    try:
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - decoder errors come in many types
                raise _failed(uid, plugin, e) from None
            yield frame
    finally:
        frames.close()
