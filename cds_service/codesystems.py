"""The service's own code systems, served as FHIR R4 CodeSystem resources.

Two codes the service sends have no standard system: the ACR appropriateness category of a rating
(beside the PAMA rating code) and the reason a clinician gives for overriding a card. Their system
URLs are canonical URLs under the site's base (``CDS_CANONICAL_BASE``, by default
``CDS_PUBLIC_BASE_URL``) and resolve: ``GET {base}/fhir/CodeSystem/{id}`` answers the CodeSystem
with its concepts. EHRs store these URLs with the ratings and the feedback, so once a site is live
its base must not change (see the README: changing it is a migration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PATH = "/fhir/CodeSystem"
ACR_CATEGORY = "acr-appropriateness-category"
OVERRIDE_REASON = "override-reason"
PUBLISHER = "Lumbar imaging appropriateness CDS service"
# The override-reason system of the cards issued before the systems had canonical URLs
LEGACY_OVERRIDE_SYSTEM = "https://cds-lbp-imaging.example.org/CodeSystem/override-reason"


@dataclass(frozen=True)
class SystemUrls:
    """The canonical URL of each of the service's code systems."""

    root: str  # {canonical base}/fhir/CodeSystem
    acr_category: str
    override_reason: str

    @classmethod
    def under(cls, base: str, override_reason: str | None = None) -> SystemUrls:
        """The URLs under a canonical base; a site's own override-reason system if it has one."""
        root = base.rstrip("/") + PATH
        return cls(root=root, acr_category=f"{root}/{ACR_CATEGORY}",
                   override_reason=override_reason or f"{root}/{OVERRIDE_REASON}")


def code_systems(urls: SystemUrls, categories: dict[str, str],
                 override_reasons: list[dict[str, str]], version: str) -> dict[str, dict[str, Any]]:
    """id -> CodeSystem (FHIR R4 JSON) of every system whose canonical URL is ours."""
    systems = {ACR_CATEGORY: code_system(
        ACR_CATEGORY, urls.acr_category, version, "ACRAppropriatenessCategory",
        "ACR Appropriateness Criteria rating category",
        "The rating category of an imaging study in a clinical scenario (variant) of the "
        "ACR Appropriateness Criteria, sent beside the PAMA appropriateness rating.",
        [{"code": code, "display": display} for code, display in categories.items()])}
    # A site that names its own override-reason system (cards/common.yaml) publishes it itself.
    if urls.override_reason == f"{urls.root}/{OVERRIDE_REASON}":
        systems[OVERRIDE_REASON] = code_system(
            OVERRIDE_REASON, urls.override_reason, version, "CardOverrideReason",
            "Reasons for overriding a lumbar imaging appropriateness card",
            "The reasons a clinician may give for not following a card of this service "
            "(CDS Hooks overrideReasons; returned in feedback).",
            _unique(override_reasons))
    return systems


def _unique(reasons: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    for r in reasons:
        seen.setdefault(r["code"], {"code": r["code"], "display": r["display"]})
    return list(seen.values())


def code_system(cs_id: str, url: str, version: str, name: str, title: str, description: str,
                concepts: list[dict[str, str]]) -> dict[str, Any]:
    """A complete FHIR R4 CodeSystem of the service's (every concept listed)."""
    return {
        "resourceType": "CodeSystem", "id": cs_id, "url": url, "version": version,
        "name": name, "title": title, "status": "active", "experimental": False,
        "publisher": PUBLISHER, "description": description, "caseSensitive": True,
        "content": "complete", "count": len(concepts), "concept": concepts,
    }


def search_bundle(systems: dict[str, dict[str, Any]], base: str,
                  url: str | None = None) -> dict[str, Any]:
    """A searchset Bundle of the code systems (all, or the one with the canonical ``url``)."""
    found = [cs for cs in systems.values() if url is None or cs["url"] == url]
    return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
            "entry": [{"fullUrl": f"{base.rstrip('/')}{PATH}/{cs['id']}", "resource": cs,
                       "search": {"mode": "match"}} for cs in found]}
