"""Generated DICOM test data: small Secondary Capture instances for named patients.

Used by the integration tests and by the demo (scripts/demo.sh) so both load the same shape of
data into Orthanc.
"""

import io

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def make_instance(patient_id, study_uid, series_uid, study_no, series_no, inst_no, study_date, modality="OT", issuer=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.PatientName = f"Test^{patient_id.strip()}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(study_no)
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"ACC{study_no:04d}"
    ds.StudyDescription = f"Study {study_no}"
    ds.SeriesNumber = series_no
    ds.InstanceNumber = inst_no
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(64))
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def generate(patients, padded):
    """Yields (patient_id, study_uid, bytes) for every instance to load."""
    study_no = 0
    for pid, shape in patients.items():
        for s in range(shape["studies"]):
            study_no += 1
            study_uid = generate_uid()
            for r in range(shape["series"]):
                series_uid = generate_uid()
                for i in range(shape["instances"]):
                    yield pid, study_uid, make_instance(pid, study_uid, series_uid, study_no, r + 1, i + 1, f"2024{(s % 12) + 1:02d}15")
    for pid, studies in padded:
        for _ in range(studies):
            study_no += 1
            study_uid = generate_uid()
            yield pid, study_uid, make_instance(pid, study_uid, generate_uid(), study_no, 1, 1, "20230101")
