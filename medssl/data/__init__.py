"""medssl.data: from files to de-identified manifests, splits and MONAI datalists.

Modules (imported on use, so ``import medssl.data`` stays light):

- :mod:`medssl.data.manifest` - the JSONL manifest: fields, schema, read/write/validate/check.
- :mod:`medssl.data.private_map` - the private source map ``<manifest>.private.jsonl`` (paths, mode 0600).
- :mod:`medssl.data.deid` - keyed pseudonyms (``MEDSSL_DEID_KEY``), key strength and the scrypt key check,
  PHI scrubbing of free text.
- :mod:`medssl.data.ingest_state` - ingest's state file, errors file and private map, without clear paths.
- :mod:`medssl.data.dicom_scan` - header-only DICOM reads, DICOMDIR references, folder walk.
- :mod:`medssl.data.dicomdir` - DICOMDIR references resolved only inside the export folder (no ``..``, no
  symbolic link out).
- :mod:`medssl.data.dicom_values` - header values validated against their value representation and DICOM
  vocabulary (Modality, PhotometricInterpretation, ViewPosition) before they reach any output.
- :mod:`medssl.data.dicom_geometry` - declared geometry checked against the pixel data (frames, size, bits,
  transfer syntax, caps) from the header alone.
- :mod:`medssl.data.verify` - decode verification of every record (``ingest --verify-decode``,
  ``manifest validate --decode``).
- :mod:`medssl.data.ingest` - PACS export -> manifest + errors file, incremental.
- :mod:`medssl.data.splits` - grouped stratified splits and nested label-fraction subsamples.
- :mod:`medssl.data.datalist` - MONAI datalist export.
"""
