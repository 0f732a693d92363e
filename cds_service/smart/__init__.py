"""The SMART on FHIR app (served under /app/) that asks the ordering clinician the questions the
record leaves open, shows the rating those answers give (the same engine as the hooks), and
writes them to the EHR as a QuestionnaireResponse, which the next hook call reads.

Launched by the EHR from a card's ``smart`` link (CDS Hooks 2.0; SMART App Launch 2.x EHR launch
with PKCE); the card's ``appContext`` names the order and the questions (no PHI).
"""

from cds_service.smart.routes import router
from cds_service.smart.service import SmartApp

__all__ = ["SmartApp", "router"]
