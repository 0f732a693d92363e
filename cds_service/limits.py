"""Limits on what one request may cost: draft orders, nesting, codings per concept, code length.

The draft orders are walked whole (an explicit stack, no recursion: they are copied into the
answer, so their depth matters); the patient record is checked where the service reads it, the
concepts at the top of each resource. Both checks are linear in what they look at. Over a limit the
caller answers 413 with an OperationOutcome naming the limit and where it was exceeded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The concepts of a resource whose every coding the service looks up (a status or category is
# read for its first code only, so its size costs nothing).
READ_CONCEPTS = ("code", "reasonCode", "medicationCodeableConcept")


@dataclass(frozen=True)
class Limits:
    max_depth: int = 64  # JSON nesting of a draft order
    max_drafts: int = 200  # entries of context.draftOrders
    max_codings: int = 64  # codings in one CodeableConcept
    max_code_length: int = 512  # characters of a coding's code or system


@dataclass(frozen=True)
class Exceeded:
    """A limit the request is over: what, and where (an expression naming the field)."""

    message: str
    where: str


def check_request(body: Any, limits: Limits) -> Exceeded | None:
    """The first limit the draft orders of a parsed hook request exceed, or None."""
    context = body.get("context") if isinstance(body, dict) else None
    drafts = context.get("draftOrders") if isinstance(context, dict) else None
    entries = drafts.get("entry") if isinstance(drafts, dict) else None
    where = "context.draftOrders"
    if isinstance(entries, list) and len(entries) > limits.max_drafts:
        return Exceeded(f"{len(entries)} draft orders; at most {limits.max_drafts} per call",
                        f"{where}.entry")
    if not isinstance(drafts, dict):
        return None
    stack: list[tuple[Any, int]] = [(drafts, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limits.max_depth:
            return Exceeded(f"JSON nested deeper than {limits.max_depth} levels", where)
        if type(value) is dict:
            fault = _concept_fault(value, limits)
            if fault:
                return Exceeded(fault, where)
            children: Iterable[Any] = value.values()
        else:
            children = value
        depth += 1
        stack.extend((c, depth) for c in children if type(c) is dict or type(c) is list)
    return None


def check_resources(key: str, resources: list[dict[str, Any]],
                    limits: Limits) -> Exceeded | None:
    """The first limit a patient-record resource exceeds in the concepts the service reads.

    (Written for the compiled module, which runs it for every concept of every resource of a
    chart: ``isinstance`` narrows a JSON value to a list or dict, so the loops index the list
    and read the dict directly.)
    """
    for resource in resources:
        for name in READ_CONCEPTS:
            value = resource.get(name)
            if value is None:
                continue
            fault = (next((f for c in value if (f := _concept_fault(c, limits))), None)
                     if isinstance(value, list) else _concept_fault(value, limits))
            if fault:
                return Exceeded(fault, f"prefetch.{key}")
    return None


def _concept_fault(concept: Any, limits: Limits) -> str | None:
    """What is wrong with a concept (too many codings, a code or system too long), or None."""
    if not isinstance(concept, dict):
        return None
    codings = concept.get("coding")
    if not isinstance(codings, list):
        return None
    if len(codings) > limits.max_codings:
        return f"{len(codings)} codings in one concept; at most {limits.max_codings}"
    longest = limits.max_code_length
    for coding in codings:
        if isinstance(coding, dict):
            code, system = coding.get("code"), coding.get("system")
            if ((isinstance(code, str) and len(code) > longest)
                    or (isinstance(system, str) and len(system) > longest)):
                return f"a code or system longer than {longest} characters"
    return None
