"""Pixel readers for every manifest ``source`` (DICOM, NIfTI/NRRD, PNG/JPEG/TIFF, npz, h5, whole-slide tiles).

Each reader returns a float32 ``(C, H, W)`` array in native intensity units and the ``(low, high)`` range that the
intensity scaling maps to [0, 1]; :class:`LoadRecordd` dispatches on ``record["source"]``.
"""

from medssl.data.readers.dicom import read_dicom_frame
from medssl.data.readers.image import read_image_file
from medssl.data.readers.load import LoadRecordd, infer_source, read_record
from medssl.data.readers.npz import read_npz_image
from medssl.data.readers.volume import read_volume_slice
from medssl.data.readers.wsi import list_tile_records, read_wsi_tile

__all__ = [
    "LoadRecordd",
    "infer_source",
    "list_tile_records",
    "read_dicom_frame",
    "read_image_file",
    "read_npz_image",
    "read_record",
    "read_volume_slice",
    "read_wsi_tile",
]
