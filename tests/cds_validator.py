"""A CDS Hooks 2.0 response validator: the spec's rules (and our stricter profile), not a snapshot.

Each function returns a list of problems, each starting with a path; an empty list means valid.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

PAMA_PREFIX = "http://fhir.org/argonaut/Extension/pama-rating"
PAMA_SYSTEM = "http://fhir.org/argonaut/CodeSystem/pama-rating"
PAMA_CODES = {"appropriate", "not-appropriate", "no-criteria-apply"}
URL = re.compile(r"^https?://[^\s/]+")
REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")
SEMVER = re.compile(r"\d+\.\d+(\.\d+)?")


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return isinstance(value, str)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _no_empty_values(value: Any, path: str, problems: list[str], top: str = "") -> None:
    """No optional field may be null, "", [] or {} anywhere (the required top list may be [])."""
    if isinstance(value, dict):
        for k, v in value.items():
            p = f"{path}/{k}"
            if v is None or v == "" or v == [] or v == {}:
                if not (top and k == top and v == []):
                    problems.append(f"{p}: empty or null value must be omitted")
            else:
                _no_empty_values(v, p, problems)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _no_empty_values(v, f"{path}/{i}", problems)


def _coding(value: Any, path: str, problems: list[str], need_display: bool = False) -> None:
    if not isinstance(value, dict):
        problems.append(f"{path}: Coding must be an object")
        return
    for key in ("system", "code") + (("display",) if need_display else ()):
        if not _nonempty_str(value.get(key)):
            problems.append(f"{path}/{key}: required")


def _pama(resource: dict[str, Any], path: str, problems: list[str]) -> None:
    ext = [e for e in resource.get("extension") or [] if isinstance(e, dict)]
    pama = {e.get("url"): e for e in ext if str(e.get("url", "")).startswith(PAMA_PREFIX)}
    if not pama:
        return
    rating = pama.get(PAMA_PREFIX)
    if rating is None:
        problems.append(f"{path}/extension: pama-rating extension missing")
    else:
        codings = (rating.get("valueCodeableConcept") or {}).get("coding") or []
        if not any(c.get("system") == PAMA_SYSTEM and c.get("code") in PAMA_CODES
                   for c in codings if isinstance(c, dict)):
            problems.append(f"{path}/extension: pama-rating needs a {PAMA_SYSTEM} coding "
                            f"with one of {sorted(PAMA_CODES)}")
    qcdsm = pama.get(PAMA_PREFIX + "-qcdsm-consulted")
    if qcdsm is None or not _nonempty_str(qcdsm.get("valueString")):
        problems.append(f"{path}/extension: pama-rating-qcdsm-consulted with valueString "
                        "required")
    consult = pama.get(PAMA_PREFIX + "-consult-id")
    if consult is not None:
        value = str(consult.get("valueUri", ""))
        if not value.startswith("urn:uuid:") or not _is_uuid(value[9:]):
            problems.append(f"{path}/extension: pama-rating-consult-id must be urn:uuid:<uuid>")
    auc = pama.get(PAMA_PREFIX + "-auc-applied")
    if auc is not None and not _nonempty_str(auc.get("valueUri")):
        problems.append(f"{path}/extension: pama-rating-auc-applied needs valueUri")


def _action(action: Any, path: str, problems: list[str]) -> None:
    if not isinstance(action, dict):
        problems.append(f"{path}: action must be an object")
        return
    kind = action.get("type")
    if kind not in ("create", "update", "delete"):
        problems.append(f"{path}/type: must be create, update or delete (lower case), "
                        f"got {kind!r}")
    if not _nonempty_str(action.get("description")):
        problems.append(f"{path}/description: required")
    resource = action.get("resource")
    if resource is not None:
        if not isinstance(resource, dict):
            problems.append(f"{path}/resource: must be a JSON object, not "
                            f"{type(resource).__name__}")
            resource = None
        elif not _nonempty_str(resource.get("resourceType")):
            problems.append(f"{path}/resource/resourceType: required")
    if kind in ("create", "update") and resource is None and "resource" not in action:
        problems.append(f"{path}/resource: required for {kind}")
    if kind == "update" and isinstance(resource, dict) and not _nonempty_str(resource.get("id")):
        problems.append(f"{path}/resource/id: an update needs the resource id")
    if kind == "delete":
        if "resource" in action:
            problems.append(f"{path}/resource: a delete carries resourceId, not resource")
        rid = action.get("resourceId")
        if not (isinstance(rid, str) and REFERENCE.match(rid)):
            problems.append(f"{path}/resourceId: a delete needs a relative reference Type/id")
    if isinstance(resource, dict):
        _pama(resource, f"{path}/resource", problems)


def _card(card: Any, path: str, problems: list[str], seen: set[str]) -> None:
    if not isinstance(card, dict):
        problems.append(f"{path}: card must be an object")
        return
    if not _is_uuid(card.get("uuid")):
        problems.append(f"{path}/uuid: required (a UUID) so that feedback can be sent")
    elif card["uuid"] in seen:
        problems.append(f"{path}/uuid: duplicate")
    else:
        seen.add(card["uuid"])
    summary = card.get("summary")
    if not _nonempty_str(summary):
        problems.append(f"{path}/summary: required")
    elif len(summary) >= 140:
        problems.append(f"{path}/summary: must be under 140 characters ({len(summary)})")
    if card.get("indicator") not in ("info", "warning", "critical"):
        problems.append(f"{path}/indicator: must be info, warning or critical")
    source = card.get("source")
    if not isinstance(source, dict) or not _nonempty_str(source.get("label")):
        problems.append(f"{path}/source/label: required")
    else:
        for key in ("url", "icon"):
            if key in source and not (isinstance(source[key], str) and URL.match(source[key])):
                problems.append(f"{path}/source/{key}: must be an absolute URL")
        if "topic" in source:
            _coding(source["topic"], f"{path}/source/topic", problems)
    if "detail" in card and not isinstance(card["detail"], str):
        problems.append(f"{path}/detail: must be a string")
    suggestions = card.get("suggestions")
    if suggestions is not None:
        if not isinstance(suggestions, list):
            problems.append(f"{path}/suggestions: must be an array")
            suggestions = []
        behavior = card.get("selectionBehavior")
        if suggestions and behavior not in ("at-most-one", "any"):
            problems.append(f"{path}/selectionBehavior: required with suggestions "
                            "(at-most-one or any)")
        recommended = 0
        for i, s in enumerate(suggestions):
            sp = f"{path}/suggestions/{i}"
            if not isinstance(s, dict):
                problems.append(f"{sp}: must be an object")
                continue
            if not _nonempty_str(s.get("label")):
                problems.append(f"{sp}/label: required")
            if "uuid" in s:
                if not _nonempty_str(s["uuid"]):
                    problems.append(f"{sp}/uuid: must be a string")
                elif s["uuid"] in seen:
                    problems.append(f"{sp}/uuid: duplicate")
                else:
                    seen.add(s["uuid"])
            if "isRecommended" in s and not isinstance(s["isRecommended"], bool):
                problems.append(f"{sp}/isRecommended: must be a boolean")
            recommended += s.get("isRecommended") is True
            for j, a in enumerate(s.get("actions") or []):
                _action(a, f"{sp}/actions/{j}", problems)
        if behavior == "at-most-one" and recommended > 1:
            problems.append(f"{path}/suggestions: at most one isRecommended under at-most-one")
    for i, reason in enumerate(card.get("overrideReasons") or []):
        _coding(reason, f"{path}/overrideReasons/{i}", problems, need_display=True)
    for i, link in enumerate(card.get("links") or []):
        lp = f"{path}/links/{i}"
        if not isinstance(link, dict):
            problems.append(f"{lp}: must be an object")
            continue
        if not _nonempty_str(link.get("label")):
            problems.append(f"{lp}/label: required")
        if not (isinstance(link.get("url"), str) and URL.match(link["url"])):
            problems.append(f"{lp}/url: must be an absolute URL")
        if link.get("type") not in ("absolute", "smart"):
            problems.append(f"{lp}/type: must be absolute or smart")
        if "appContext" in link and link.get("type") != "smart":
            problems.append(f"{lp}/appContext: only for smart links")


def validate_service_response(body: Any) -> list[str]:
    """Problems of a CDS service response (empty = valid)."""
    problems: list[str] = []
    if not isinstance(body, dict):
        return ["/: response must be a JSON object"]
    for key in body:
        if key not in ("cards", "systemActions", "extension"):
            problems.append(f"/{key}: unknown top-level field")
    cards = body.get("cards")
    if not isinstance(cards, list):
        problems.append("/cards: required array")
        cards = []
    seen: set[str] = set()
    for i, card in enumerate(cards):
        _card(card, f"/cards/{i}", problems, seen)
    actions = body.get("systemActions")
    if actions is not None:
        if not isinstance(actions, list) or not actions:
            problems.append("/systemActions: must be a non-empty array when present")
        else:
            for i, a in enumerate(actions):
                _action(a, f"/systemActions/{i}", problems)
    ext = body.get("extension")
    if ext is not None:
        if not isinstance(ext, dict):
            problems.append("/extension: must be an object")
        elif "systemActions" in ext:
            if not isinstance(ext["systemActions"], list):
                problems.append("/extension/systemActions: must be an array")
            else:
                for i, a in enumerate(ext["systemActions"]):
                    _action(a, f"/extension/systemActions/{i}", problems)
                if actions is not None and ext["systemActions"] != actions:
                    problems.append("/extension/systemActions: must equal /systemActions")
    _no_empty_values(body, "", problems, top="cards")
    return problems


def validate_discovery(body: Any) -> list[str]:
    problems: list[str] = []
    services = body.get("services") if isinstance(body, dict) else None
    if not isinstance(services, list):
        return ["/services: required array"]
    seen: set[tuple[str, str]] = set()
    for i, s in enumerate(services):
        p = f"/services/{i}"
        if not isinstance(s, dict):
            problems.append(f"{p}: must be an object")
            continue
        for key in ("hook", "id", "description"):
            if not _nonempty_str(s.get(key)):
                problems.append(f"{p}/{key}: required")
        if "title" in s and not isinstance(s["title"], str):
            problems.append(f"{p}/title: must be a string")
        for key in ("version", "hookVersion"):  # CDS Hooks 3.0: the versions implemented
            if key in s and not (isinstance(s[key], str) and SEMVER.fullmatch(s[key])):
                problems.append(f"{p}/{key}: must be a version (major.minor[.patch])")
        prefetch = s.get("prefetch")
        if prefetch is not None and not (isinstance(prefetch, dict) and all(
                isinstance(v, str) for v in prefetch.values())):
            problems.append(f"{p}/prefetch: must map keys to template strings")
        key = (str(s.get("hook")), str(s.get("id")))
        if key in seen:
            problems.append(f"{p}/id: duplicate")
        seen.add(key)
    _no_empty_values(body, "", problems, top="services")
    return problems


def validate_operation_outcome(body: Any) -> list[str]:
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ["/resourceType: must be OperationOutcome"]
    issues = body.get("issue")
    if not isinstance(issues, list) or not issues:
        return ["/issue: required non-empty array"]
    problems = []
    for i, issue in enumerate(issues):
        if issue.get("severity") not in ("fatal", "error", "warning", "information"):
            problems.append(f"/issue/{i}/severity: invalid")
        if not _nonempty_str(issue.get("code")):
            problems.append(f"/issue/{i}/code: required")
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        if not _nonempty_str(text):
            problems.append(f"/issue/{i}: diagnostics or details.text required")
    return problems


def assert_valid(problems: list[str]) -> None:
    assert not problems, "invalid CDS Hooks payload:\n" + "\n".join(problems)
