"""A synthetic CT phantom: plausible trunk anatomy in HU, written as real CT DICOM series.

It is the embedded default data of the demo and the tests: deterministic per seed, labelled for two
downstream tasks (which anatomical region a slice shows, and whether it shows a lesion), and carrying
fake patient identifiers so that de-identification has something to remove.
"""

from data_prep.phantom.synth import (
    REGION_CLASSES,
    PhantomSlices,
    PhantomVolume,
    render_slices,
    render_volume,
)

__all__ = ["REGION_CLASSES", "PhantomSlices", "PhantomVolume", "render_slices", "render_volume"]
