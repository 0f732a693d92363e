"""How long a stored text of a feedback item (or an EHR address the SMART app keeps) may be,
declared once.

The request models (:mod:`cds_service.protocol`) refuse a longer value with 400, and the table
models (:mod:`cds_service.store.models`) size their columns from the same numbers, so that what
a request may carry is what a row can hold. ``None`` would mean unbounded text.
"""

from __future__ import annotations

CARD_ID = 100  # the card a feedback item is about (``feedback.card_uuid``)
CODING_SYSTEM = 300  # an override reason's system (``feedback.override_system``)
CODING_CODE = 100  # an override reason's code (``feedback.override_code``)
CODING_DISPLAY = 300  # an override reason's display (``feedback.override_display``)
TENANT = 200  # the EHR tenant a JWT names (``hook_call.tenant``); a longer one is cut to fit
# an EHR address the SMART app's session keeps (``app_session.iss``, ``token_endpoint``,
# ``redirect_uri``): a longer one is refused where it is read (an unusable configuration)
SMART_URL = 2000
