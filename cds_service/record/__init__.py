"""The patient record a hook is judged on: what prefetch (and later the FHIR server) provided."""

from cds_service.record.prefetch import (
    PREFETCH_TEMPLATES,
    PatientRecord,
    Source,
    SourceState,
    record_from_prefetch,
)

__all__ = ["PREFETCH_TEMPLATES", "PatientRecord", "Source", "SourceState", "record_from_prefetch"]
