"""SMART scopes as granted to a token, read in both forms EHRs send: SMART App Launch v1
(``patient/Condition.read``, ``.write``, ``.*``) and v2 (``patient/Condition.rs``, ``.cruds``,
with an optional ``?`` query that narrows a grant without removing it). Used wherever the
service reasons about what a token allows: the hook's FHIR fetch (``fhirAuthorization.scope``)
and the SMART app's grant."""

from __future__ import annotations

import re

# (patient|user|system)/(Type|*).(permissions)[?query]
SCOPE = re.compile(r"(patient|user|system)/([A-Za-z]+|\*)\.([a-z*]+)(\?\S*)?")
V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}
V2_ORDER = "cruds"


def permissions(perms: str) -> frozenset[str]:
    """The v2 letters (c, r, u, d, s) a permission part grants; none if it is malformed (v2
    letters out of order or repeated, or an unknown word)."""
    if perms in V1:
        return V1[perms]
    positions = [V2_ORDER.find(p) for p in perms]
    if -1 in positions or positions != sorted(set(positions)):
        return frozenset()
    return frozenset(perms)


def granted(scope: str | None, resource_type: str) -> frozenset[str]:
    """Every permission the scopes grant on a resource type (any context level)."""
    found: set[str] = set()
    for item in (scope or "").split():
        match = SCOPE.fullmatch(item)
        if match and match.group(2) in (resource_type, "*"):
            found |= permissions(match.group(3))
    return frozenset(found)


def can_search(scope: str | None, resource_type: str) -> bool:
    """Whether a token with these scopes may search (v2 ``s``, v1 ``read``) a resource type."""
    return "s" in granted(scope, resource_type)


def can_read(scope: str | None, resource_type: str) -> bool:
    """Whether it may read one resource by id (v2 ``r``, v1 ``read``)."""
    return "r" in granted(scope, resource_type)


def can_create(scope: str | None, resource_type: str) -> bool:
    """Whether it may create a resource (v2 ``c``, v1 ``write``)."""
    return "c" in granted(scope, resource_type)
