"""Tiny medical test data written in code: DICOM radiographs with patient attributes, label CSVs,
NIfTI volumes with organ maps. Nothing here is real patient data."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

PHI = {"PatientName": "Zorbulon^Quentessa", "PatientID": "PIDX7731", "PatientBirthDate": "19610302",
       "AccessionNumber": "ACCQ99182", "InstitutionName": "Saint Hypothetical Infirmary",
       "ReferringPhysicianName": "Plumtree^Osvald"}
PHI_STRINGS = ["Zorbulon", "Quentessa", "PIDX7731", "19610302", "1961-03-02", "ACCQ99182", "Hypothetical",
               "Plumtree", "Osvald"]


def write_dicom(path: Path, pixels: np.ndarray, view: str = "PA", photometric: str = "MONOCHROME2",
                bits_stored: int = 12, window: tuple[float, float] | None = None, slope: float = 1.0,
                intercept: float = 0.0, burned_in: bool = False, voi_lut: np.ndarray | None = None,
                voi_lut_bits: int = 16, voi_lut_vr: str = "OW") -> Path:
    """A single-frame unsigned DICOM radiograph carrying the fake patient attributes of ``PHI``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate = "20240117"
    ds.Modality, ds.ViewPosition = "DX", view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if burned_in:
        ds.BurnedInAnnotation = "YES"
    if voi_lut is not None:  # output LUT starting at stored value 0, one entry per 16-bit OW word
        from pydicom.dataelem import DataElement
        from pydicom.dataset import Dataset

        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, voi_lut_bits]  # 8-bit entries are still stored in 16-bit words
        values = np.asarray(voi_lut, dtype=np.uint16)
        item.add(DataElement(0x00283006, voi_lut_vr,  # LUT Data: OW bytes or a US value list
                             values.tobytes() if voi_lut_vr == "OW" else [int(v) for v in values]))
        ds.VOILUTSequence = [item]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def chest_pixels(seed: int, bright_left: bool, size: int = 32) -> np.ndarray:
    """12-bit noise with one brighter half (a learnable 'finding')."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(200, 1200, (size, size))
    half = slice(0, size // 2) if bright_left else slice(size // 2, size)
    pixels[:, half] += 2500
    return pixels


def write_dicom_set(folder: Path, count: int = 8) -> Path:
    """``count`` DICOMs in folders named after the patient ID, plus one truncated file and one
    lateral view; returns ``manifest.csv`` (image, caption, label)."""
    rows = []
    for i in range(count):
        finding = i % 2 == 0
        path = write_dicom(folder / f"{PHI['PatientID']}" / f"{PHI['PatientName']}_{i}.dcm", chest_pixels(i, finding),
                           window=(2000.0, 4000.0))
        rows.append({"image": str(path.relative_to(folder)), "label": "effusion" if finding else "normal",
                     "caption": "a chest x-ray with a pleural effusion" if finding else "a normal chest x-ray"})
    lateral = write_dicom(folder / PHI["PatientID"] / "lateral.dcm", chest_pixels(99, True), view="LL")
    rows.append({"image": str(lateral.relative_to(folder)), "label": "normal", "caption": "a lateral chest x-ray"})
    broken = folder / PHI["PatientID"] / f"{PHI['PatientName']}_broken.dcm"
    broken.write_bytes(write_dicom(folder / "tmp.dcm", chest_pixels(5, True)).read_bytes()[:300])
    (folder / "tmp.dcm").unlink()
    rows.append({"image": str(broken.relative_to(folder)), "label": "normal", "caption": "a normal chest x-ray"})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_ct_set(folder: Path, depth: int = 8, liver_slices: int | None = None) -> Path:
    """A tiny NIfTI CT (HU) with a 'liver' in the first ``liver_slices`` slices (default: the lower
    half; 0 = none) and its label map; returns ``manifest.csv`` (image, label_map, label_names)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    hu = rng.normal(-800, 30, (24, 24, depth)).astype(np.int16)  # air / lung
    labels = np.zeros((24, 24, depth), dtype=np.uint8)
    hu[6:18, 6:18, :] = rng.normal(40, 10, (12, 12, depth))  # soft tissue
    liver = depth // 2 if liver_slices is None else liver_slices
    labels[8:16, 8:16, :liver] = 5  # liver in slices 0 .. liver - 1
    hu[8:16, 8:16, :liver] = 90
    labels[10:14, 2:5, :] = 2  # a kidney in every slice
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "seg.nii.gz")
    (folder / "labels.json").write_text(json.dumps({"2": "kidney_right", "5": "liver"}))
    manifest = folder / "manifest.csv"
    manifest.write_text("image,label_map,label_names\nct.nii.gz,seg.nii.gz,labels.json\n")
    return manifest


def write_ct_series(folder: Path, depth: int = 4, size: int = 16) -> Path:
    """A tiny CT DICOM series (stored = HU + 1024, intercept -1024) carrying the fake patient
    attributes; slice k has HU value ``100 * k`` everywhere. Returns the folder."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{PHI['PatientID']}_{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = np.full((size, size), 1024 + 100 * k, dtype=np.uint16).tobytes()
        ds.save_as(str(folder / f"{PHI['PatientID']}_{k}.dcm"), enforce_file_format=True)
    return folder
