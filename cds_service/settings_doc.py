"""The configuration table of ``docs/configuration.md``, generated from :class:`Settings`.

Every field of the settings model is one environment variable; its meaning is written here, keyed
by field name. :func:`render_table` raises when a field has no meaning or a meaning names no field,
so the page cannot lose a variable or keep one that is gone (``tests/test_docs.py`` compares the
page with the table). After changing the settings, rewrite the page's table with::

    .venv/bin/python -m cds_service.settings_doc --write
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cds_service.settings import PROJECT_DIR, Settings

PAGE = PROJECT_DIR / "docs" / "configuration.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"
WRITE_COMMAND = ".venv/bin/python -m cds_service.settings_doc --write"

# field -> what the variable does (one or two sentences, for an operator)
DESCRIPTIONS: dict[str, str] = {
    "env": "Mode. `development` is what `make run` sets: without a trusted-issuer file, calls "
           "are accepted with or without a JWT; without `CDS_AUDIT_HASH_KEY`, a random key is "
           "kept in the data directory; http JWKS and FHIR URLs are allowed. Outside "
           "`development` the service refuses to start without `CDS_TRUSTED_ISSUERS_FILE`, "
           "`CDS_AUDIT_HASH_KEY` and an https `CDS_PUBLIC_BASE_URL`.",
    "public_base_url": "The https base URL the EHR calls (e.g. `https://cds.example.org`). "
                       "Every JWT `aud` is checked against it plus the path called, never "
                       "against the Host header; the SMART app's launch and redirect URLs are "
                       "under it. Required outside development.",
    "canonical_base": "Base of the canonical URLs of the service's code systems and "
                      "Questionnaire (`{base}/fhir/CodeSystem/{id}`, "
                      "`{base}/fhir/Questionnaire/lbp-imaging-auc`). EHRs store these URLs "
                      "with ratings, feedback and answers: fix it once live, and move it only "
                      "with `CDS_CANONICAL_BASE_PREVIOUS`.",
    "canonical_base_previous": "Former canonical bases, comma-separated: feedback naming their "
                               "override-reason system, and answers to the Questionnaire "
                               "under them, are still read as the service's own.",
    "max_body_bytes": "Largest request body accepted; a larger one gets 413.",
    "max_draft_orders": "Draft orders per hook call; more gets 413 (`too-costly`) naming the "
                        "limit.",
    "max_json_depth": "Nesting depth of a draft order; deeper gets 413.",
    "max_codings_per_concept": "Codings in one CodeableConcept of a draft order, or of the "
                               "concepts read from the record (`code`, `reasonCode`, "
                               "`medicationCodeableConcept`); more gets 413 (a fetched source "
                               "over it is not used).",
    "max_code_length": "Characters of a code or code system, in the same places; longer gets "
                       "413.",
    "offload_body_bytes": "Hook bodies at least this large are evaluated in a worker thread, so "
                          "that the event loop keeps answering other calls.",
    "offload_cost": "Hook calls whose estimated cost, the orders to rate x (the record's "
                    "resources + 100), is at least this are evaluated in a worker thread too "
                    "(many drafts against a long chart is a small body and a long evaluation).",
    "limit_concurrency": "Connections and requests one worker holds at once (uvicorn's "
                         "`limit_concurrency`); past it a request is answered 503 at once. "
                         "Open connections count, idle or slow ones too: uvicorn has no "
                         "header timeout, so the proxy in front must cut connections that "
                         "never finish their headers (docs/deploying.md).",
    "body_read_timeout_seconds": "A request body not received in full within this time gets "
                                 "408 and the connection is closed.",
    "metrics_token": "Bearer token that scrapes of `/metrics` must send. Unset: `/metrics` is "
                     "served without a token in `development` and `test`, and not at all "
                     "(404) in `production`.",
    "openapi_public": "Serve `/openapi.json` in `production` too (it is always served in "
                      "`development` and `test`).",
    "cors_origins": "Browser origins allowed by CORS, comma-separated (`*`: any).",
    "trusted_issuers_file": "JSON file of the EHR issuers whose JWTs are accepted (`iss`, "
                            "`jwks_url` or `jwks`, optional `tenants`). Required outside "
                            "development.",
    "jwt_algorithms": "JWT algorithms accepted, comma-separated; symmetric ones (HS256...) and "
                      "`none` are always refused.",
    "jwt_leeway_seconds": "Clock skew allowed on `exp` and `iat`.",
    "jwt_max_lifetime_seconds": "Longest `exp - iat` accepted.",
    "jwt_replay_timeout_seconds": "How long a call waits for the database's JWT replay (`jti`) "
    "check. Past it (or when the database fails) this process decides alone, no call waits "
    "for the database until one background probe at a time (at most one a second) finds it "
    "answering, and the `jti`s accepted meanwhile are then written to it (so another worker "
    "refuses their replay). Counted in `cds_jwt_replay_fallback_total`.",
    "jwks_cache_seconds": "How long a fetched JWKS is kept (an unknown `kid` fetches it again "
                          "early, at most every 30 s).",
    "jwks_timeout_seconds": "Timeout of one JWKS fetch.",
    "jwks_retry_min_seconds": "After a failed JWKS fetch, no new fetch for that issuer for "
                              "this long, doubling per failure.",
    "jwks_retry_max_seconds": "Longest wait between JWKS fetches while they keep failing; a "
                              "success resets the wait.",
    "fhir_allowed_servers": "FHIR base URLs the service may read what the prefetch lacks "
                            "from (and the only `iss` values the SMART app launches from), "
                            "comma-separated, compared exactly (scheme, host, port, path). "
                            "Empty: no outbound FHIR fetch.",
    "fhir_timeout_seconds": "One FHIR request, from connecting to the last byte of the body "
                            "(never more than the budget left). 1 s: a page of "
                            "`CDS_FHIR_PAGE_SIZE` resources from a real server's database, "
                            "not only a small page from a cache; a server that hangs costs a "
                            "search at most this long.",
    "fhir_budget_seconds": "All FHIR fetching of one hook call, name lookup included; what is "
                           "not read by then stays missing (a 412 when the order cannot be "
                           "rated without it). Why 2 s: the service fetches only when the "
                           "EHR's prefetch lacks data (with a complete prefetch it answers in "
                           "milliseconds, inside CDS Hooks' \"about 500 ms\"), and then the "
                           "alternative to waiting is no rating at all. The pages of one "
                           "search come one after another (each `next` link is in the page "
                           "before), so the budget must hold a chain of round trips. Measured "
                           "against a server answering in 100 ms with pages of 20 "
                           "(bench/RESULTS.md): a 100-resource record takes ~0.35 s when the "
                           "server ignores `_count`, and the former 0.4 s gave 412s under load; "
                           "a 380-resource record (nine pages in one search) takes ~1.0-1.1 s, "
                           "every call a 412 at 0.4 s. 2 s holds the page cap (ten pages) at "
                           "up to ~200 ms a page. The EHR's own CDS Hooks timeout is the "
                           "ceiling (CDS clients typically wait a few seconds): keep this well "
                           "below it, since evaluating and answering follow the fetch.",
    "fhir_max_pages": "Pages read per FHIR search, the first included (a server whose `next` "
                      "links never end stops here); the source stays partial beyond it.",
    "fhir_page_size": "Entries asked for per page of each FHIR search (`_count`). A server "
                      "may answer with fewer (HAPI: at most 200 unless configured otherwise; "
                      "without `_count` it pages by 20, so a search of 100 resources would "
                      "take five round trips one after another instead of one). 0: no "
                      "`_count` is sent, for a server that refuses it.",
    "fhir_fetch_without_token": "Fetch from an allow-listed server when the request sends "
                                "`fhirServer` but no `fhirAuthorization` (an open FHIR server, "
                                "as the CDS Hooks sandbox uses); no Authorization header is "
                                "sent.",
    "fhir_max_response_bytes": "Largest FHIR answer read (decoded size); a larger one is not "
                               "read and its source stays missing.",
    "knowledge_dir": "Folder of the clinical knowledge: `valuesets.yaml`, `procedures.yaml`, "
                     "`ratings.yaml` and `questions.yaml`, all four (docs/editing-knowledge.md).",
    "cards_dir": "Folder of the card wording: the card kinds, `common.yaml` and "
                 "`evidence.j2` (docs/editing-knowledge.md).",
    "qcdsm_id": "Identifier sent in each rating's `pama-rating-qcdsm-consulted` extension.",
    "auc_applied": "URI sent in each rating's `pama-rating-auc-applied` extension; empty: the "
                   "extension is left out.",
    "assume_candidate_after_failed_care": "Treat a patient with `CDS_CONSERVATIVE_CARE_WEEKS` "
                                          "of conservative care and no candidacy on record as "
                                          "a surgery or injection candidate (V3); the card "
                                          "says so where this changes the answer.",
    "conservative_care_weeks": "Weeks of conservative care the core scenario (V3) needs.",
    "elderly_over_age": "Older than this many years, age is a fracture red flag (V6).",
    "adult_age": "The ACR Low Back Pain criteria are for adults: a patient younger than this "
                 "many years is outside them (`no-criteria-apply`, no card). With no date of "
                 "birth the order is rated as for an adult, but no cancel is offered.",
    "recent_red_flag_days": "A red-flag symptom this recent counts (as does one of the current "
                            "episode).",
    "answer_valid_days": "A clinician's answer (a QuestionnaireResponse to `lbp-imaging-auc`) "
                         "counts for this many days after it was authored.",
    "smart_app_enabled": "Serve the SMART app under `/app/` and link missing-data and "
                         "not-appropriate cards to it; `false`: no app (404), no link.",
    "smart_client_id": "The SMART app's OAuth client id, as registered with the EHR.",
    "smart_scopes": "Scopes the SMART app asks for, space-separated.",
    "smart_session_seconds": "Lifetime of the SMART app's server-side session (it holds the "
                             "EHR's access token, encrypted).",
    "smart_config_cache_seconds": "How long the SMART app keeps an EHR's SMART configuration "
                                  "(per `iss`) before reading it again; launches meanwhile "
                                  "make no call to it, and concurrent ones wait for one read.",
    "smart_launches_per_minute": "Launches of the SMART app (`/app/launch`, no sign-in yet) a "
                                 "worker takes from one client address a minute; more get 429. "
                                 "Behind a proxy, the address is the one uvicorn reads from "
                                 "`X-Forwarded-For` (`FORWARDED_ALLOW_IPS`, set in the compose "
                                 "file and the Kubernetes manifests); a hospital behind one NAT "
                                 "address shares it.",
    "smart_launches_per_minute_total": "Launches of the SMART app a worker takes a minute from "
                                       "all addresses together; more get 429.",
    "smart_page_bytes": "Bytes one page of the SMART app may read from the EHR, every source "
                        "and every page of them together (what it holds in memory grows with "
                        "it); a source past it is named on the page as not read.",
    "smart_frame_ancestors": "Web origins of EHR pages that may show the SMART app in a frame "
                             "(a side panel), comma-separated, besides the origins of "
                             "CDS_FHIR_ALLOWED_SERVERS (the app's frame-ancestors); no other "
                             "site can frame it.",
    "smart_session_secret": "Signs the SMART app's session cookie and encrypts the access "
                            "token it keeps; at least 32 characters (checked outside "
                            "development).",
    "care_window_days": "With no dated back-pain episode in the record, conservative care and "
    "intervention-candidate evidence count only from this many days back (never the whole "
    "history: a naproxen order from years ago is not care for today's pain). 6 months holds the "
    "6 weeks of care the core scenario asks for in a chronic episode, and keeps out care from "
    "an earlier episode.",
    "episode_grace_days": "Conservative care started up to this many days before the "
                          "episode's onset still counts for the episode (and red-flag symptoms "
                          "from then on are current).",
    "recent_mri_months": "A lumbar MRI done within this many months raises the recent-MRI "
                         "card on an MRI order that needs no other card.",
    "recent_trauma_days": "A trauma diagnosis older than this many days is not a red flag.",
    "data_dir": "Data directory (a relative path is taken from the working directory): the "
                "SQLite database and, in development, the generated audit key.",
    "database_url": "SQLAlchemy async database URL, e.g. "
                    "`postgresql+asyncpg://user:pass@host:5432/db`.",
    "migrate_on_start": "Apply the database migrations at start-up (else run `cds-service db "
                        "upgrade`).",
    "audit_hash_key": "Secret of the keyed hash (HMAC-SHA256) that stands for patient ids in "
                      "the audit; keep it with the back-ups. Required outside development.",
    "audit_flush_seconds": "Longest a queued audit row waits for its batch to fill before it "
                           "is written.",
    "audit_batch_rows": "Hook calls per audit write (one transaction); a full batch is written "
                        "at once.",
    "audit_queue_rows": "Hook calls held in memory (about 1-3 KB each) while the database is "
                        "slow or down; beyond it they are dropped and counted.",
    "audit_retry_max_seconds": "Longest pause between audit write retries while the database "
                               "cannot be written.",
    "feedback_max_items": "Feedback items per post; more gets 413.",
    "admin_token": "Bearer token for `/admin/report`; unset: the admin routes answer 404.",
    "log_level": "Log level (`DEBUG`, `INFO`, `WARNING`, `ERROR`).",
    "log_json": "Logs as JSON lines on stderr; `false`: plain text lines.",
}

# field (default None) -> what an unset variable means, when it is more than "not used"
WHEN_UNSET: dict[str, str] = {
    "canonical_base": "`CDS_PUBLIC_BASE_URL` (`http://127.0.0.1:8080` without it)",
    "fhir_fetch_without_token": "on in `development`, off otherwise",
    "knowledge_dir": "the copy inside the package",
    "smart_session_secret": "derived from `CDS_AUDIT_HASH_KEY`",
    "database_url": "SQLite file `cds.db` in `CDS_DATA_DIR`",
    "audit_hash_key": "in development, a random key kept in `CDS_DATA_DIR`",
}


class SettingsDocError(ValueError):
    """The documentation of the settings does not match the settings model."""


def variable(field: str) -> str:
    """The environment variable of a settings field: ``CDS_<FIELD>``."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def check_coverage(fields: typing.Iterable[str]) -> None:
    """Raise unless every field has a meaning, and every meaning and note names a field."""
    names = set(fields)
    problems = []
    if missing := sorted(names - set(DESCRIPTIONS)):
        problems.append("no description for " + ", ".join(variable(n) for n in missing))
    if gone := sorted(set(DESCRIPTIONS) - names):
        problems.append("described but not a setting: " + ", ".join(variable(n) for n in gone))
    if stray := sorted(set(WHEN_UNSET) - names):
        problems.append("WHEN_UNSET names no setting: " + ", ".join(variable(n) for n in stray))
    if problems:
        raise SettingsDocError("; ".join(problems) + " (edit cds_service/settings_doc.py)")


def env_value(value: Any) -> str:
    """A value as it is written in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def default_text(name: str, info: FieldInfo) -> str:
    """The default column: the value as written in the environment, "unset", or what a
    factory computes (the first line of its docstring)."""
    if info.default_factory is not None:
        doc = (info.default_factory.__doc__ or "").strip()
        if not doc:
            raise SettingsDocError(f"{variable(name)}: its default factory needs a docstring")
        first = doc.splitlines()[0].replace("``", "`").rstrip(".")
        return first[:1].lower() + first[1:]
    value = info.get_default()
    if value is PydanticUndefined:
        return "required"
    if value is None:
        note = WHEN_UNSET.get(name)
        return f"unset: {note}" if note else "unset"
    if name in WHEN_UNSET:
        raise SettingsDocError(f"{variable(name)} has a default; drop it from WHEN_UNSET")
    if value == "":
        return "empty"
    text = f"`{env_value(value)}`"
    if name.endswith("_bytes") and isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        text += f" ({_binary_size(value)})"
    return text


def _binary_size(n: int) -> str:
    for unit in ("KiB", "MiB", "GiB"):
        n //= 1024
        if n < 1024 or n % 1024:
            return f"{n} {unit}"
    return f"{n} TiB"


CONSTRAINTS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
               (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def rules_text(info: FieldInfo) -> str:
    """What the model itself enforces: the allowed values or bounds, as a sentence."""
    choices = typing.get_args(info.annotation) if typing.get_origin(
        info.annotation) is typing.Literal else ()
    if choices:
        return " One of " + ", ".join(f"`{c}`" for c in choices) + "."
    bounds = [f"{symbol} {getattr(rule, attr)}" for rule in info.metadata
              for kind, attr, symbol in CONSTRAINTS if isinstance(rule, kind)]
    return f" Must be {' and '.join(bounds)}." if bounds else ""


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def render_table() -> str:
    """The markdown table of every setting: variable, default, meaning."""
    fields = Settings.model_fields
    check_coverage(fields)
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in fields.items():
        meaning = DESCRIPTIONS[name] + rules_text(info)
        rows.append(f"| `{variable(name)}` | {_cell(default_text(name, info))} | "
                    f"{_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def table_in_page(text: str) -> str:
    """The part of the page between the settings markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SettingsDocError(f"the page lacks the markers {START} ... {END}")
    return text[start + len(START):end].strip("\n") + "\n"


def with_table(text: str, table: str) -> str:
    """The page with its table replaced."""
    table_in_page(text)  # (checks the markers)
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cds_service.settings_doc",
                                     description="The settings table of docs/configuration.md.")
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in {PAGE}")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the page's table is not the generated one")
    args = parser.parse_args(argv)
    try:
        table = render_table()
        if not (args.write or args.check):
            print(table, end="")
            return 0
        page = PAGE.read_text(encoding="utf-8")
        if args.check:
            current = table_in_page(page) == table
            print(f"{PAGE}: " + ("up to date" if current else f"stale; run {WRITE_COMMAND}"))
            return 0 if current else 1
        PAGE.write_text(with_table(page, table), encoding="utf-8")
    except (SettingsDocError, OSError) as exc:
        print(f"settings_doc: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the settings table of {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

