"""CDS Hooks service for lumbar imaging appropriateness (ACR Low Back Pain)."""

from cds_service import native

native.guard()  # before any compiled module is imported: compiled, or the sources if stale
