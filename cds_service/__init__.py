"""CDS Hooks service for lumbar imaging appropriateness (ACR Low Back Pain)."""
