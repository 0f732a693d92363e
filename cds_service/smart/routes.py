"""The app's routes under /app/: the SMART EHR launch, its callback, and the questions page.

    GET  /app/launch?iss&launch  -> 302 to the EHR's authorize endpoint (PKCE S256, state);
                                    in a frame, first a probe that the cookie is kept there
    GET  /app/callback?code&state -> the code exchanged for a token, the id_token validated
                                    -> 303 to questions
    GET  /app/questions[?order=]  -> the questions this order needs, pre-filled, and its
                                    rating; with no order in the launch, the patient's orders
    POST /app/questions           -> "Update rating" (re-rated) or "Save answers" (written
                                    first, then re-rated; the EHR told where it listens)

Every failure is a page with its status (4xx, 502, 503), never a 500 or a trace; nothing
logged names a patient, a URL with parameters or a token.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cds_service.questionnaire import Question, build_response, parse_form
from cds_service.record.fetch import normalize_base, server_allowed
from cds_service.smart.context import AppContext, parse_app_context
from cds_service.smart.identity import signed_in_user
from cds_service.smart.launches import Launch, too_many
from cds_service.smart.oauth import (
    Grant,
    SmartConfig,
    authorize_url,
    can_write_responses,
    discover,
    exchange,
    pkce_pair,
)
from cds_service.smart.orders import lumbar_orders, rerated_order
from cds_service.smart.outbound import Outbound
from cds_service.smart.pages import (
    SCRIPT,
    Messages,
    Notice,
    QuestionsView,
    framed_page,
    orders_page,
    problem_page,
    questions_page,
    saved_page,
)
from cds_service.smart.problems import Problem, bad_state, expired
from cds_service.smart.rating import (
    Chart,
    prefill,
    rate,
    rating_view,
    read_chart,
    unavailable_view,
    why_line,
)
from cds_service.smart.service import PROBE, Session, SmartApp, digest
from cds_service.store import StoreUnavailable

log = logging.getLogger("cds_service.smart")
router = APIRouter(prefix="/app", include_in_schema=False)

CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'; "
       "img-src 'self'; form-action 'self'; base-uri 'none'")
HEADERS = {"Cache-Control": "no-store", "Content-Security-Policy": CSP,
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
MAX_FORM_BYTES = 64 * 1024
MAX_PARAM = 2000


def page(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers=HEADERS)


Handler = Callable[[Request], Awaitable[Response]]


def explained(handler: Handler) -> Handler:
    """Turn every failure of a route into a page (a Problem's own, or 503 / 500)."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        response = await _explain(handler, request)
        # (frame-ancestors: only the EHRs it works with may show the app in a frame)
        smart = _smart(request)
        response.headers["Content-Security-Policy"] = (
            f"{CSP}; frame-ancestors {smart.frame_ancestors}")
        return response

    return run


async def _explain(handler: Handler, request: Request) -> Response:
    """The handler's response, or its failure as a page (a Problem's own, or 503 / 500)."""
    try:
        return await handler(request)
    except Problem as problem:
        log.info("app page refused", extra={"route": request.url.path,
                                            "status": problem.status,
                                            "problem": problem.title})
        response = page(problem_page(problem), problem.status)
        response.headers.update(problem.headers)
        return response
    except StoreUnavailable:
        log.error("app session store unavailable", extra={"route": request.url.path})
        return page(problem_page(Problem(
            503, "The service cannot keep your session right now",
            "Its database is not available.", "Try again in a minute.")), 503)
    except Exception as exc:  # never a trace on a page; the type name in the log
        log.error("app page failed", extra={"route": request.url.path,
                                            "error": type(exc).__name__})
        return page(problem_page(Problem(
            500, "Something went wrong", "The app could not show this page.",
            "Close this window and open the app again from the card.")), 500)


def _smart(request: Request) -> SmartApp:
    smart: SmartApp = request.app.state.smart
    return smart


def _param(request: Request, name: str) -> str:
    value = request.query_params.get(name, "")
    return value if len(value) <= MAX_PARAM else ""


@router.get("/launch")
@explained
async def launch(request: Request) -> Response:
    smart = _smart(request)
    iss, launch_id = _param(request, "iss").strip(), _param(request, "launch")
    if not iss or not launch_id:
        raise Problem(400, "Not opened by the EHR",
                      "The app is opened by the EHR (a SMART EHR launch, with iss and launch); "
                      "this address was opened without them.", "Open the app from the card.")
    if not server_allowed(iss, smart.policy) or "?" in iss or "#" in iss:
        raise Problem(400, "This EHR is not known to the service",
                      "The FHIR server that opened the app (iss) is not one the service is "
                      "configured to work with.", "Ask the service's administrators to add it "
                      "to CDS_FHIR_ALLOWED_SERVERS, or open the app from your own EHR.")
    if request.headers.get("sec-fetch-dest") == "iframe":  # a side panel in the EHR's page
        framed = _framed(smart, request, iss, launch_id)
        if framed is not None:
            return framed
    address = request.client.host if request.client else "?"
    if not smart.launches.allow(address):
        raise too_many(smart.launches.retry_after())
    config = await _configuration(smart, iss)
    redirect_uri = f"{smart.base_url(request)}/app/callback"
    state = smart.keys.new_id()
    verifier, challenge = pkce_pair()
    settings = smart.settings
    target = authorize_url(config, client_id=settings.smart_client_id,
                           redirect_uri=redirect_uri, scope=settings.smart_scopes, state=state,
                           iss=iss, launch=launch_id, challenge=challenge)
    response = RedirectResponse(target, status_code=302, headers=HEADERS)
    smart.start(response, request, Launch(digest(state), verifier, iss, config.token_endpoint,
                                          redirect_uri))
    return response


async def _configuration(smart: SmartApp, iss: str) -> SmartConfig:
    """The EHR's SMART configuration, read once per ``iss`` for minutes."""
    async def read() -> SmartConfig:
        async with smart.outbound() as out:
            return await discover(out, iss)

    return await smart.configs.get(iss, read)


def _framed(smart: SmartApp, request: Request, iss: str, launch_id: str) -> Response | None:
    """In a frame, first see whether the browser keeps the app's cookie there (a probe cookie,
    then the launch again); where it does not, say so and offer a new window. None: go on."""
    again = {"iss": iss, "launch": launch_id}
    if not _param(request, "probe"):
        response = RedirectResponse(f"launch?{urlencode({**again, 'probe': '1'})}",
                                    status_code=303, headers=HEADERS)
        smart.set_cookie(response, request, PROBE, "1")
        return response
    if request.cookies.get(smart.cookie_name(request, PROBE)):
        return None
    log.info("app cookie not kept in a frame")
    return page(framed_page(f"launch?{urlencode(again)}"))


@router.get("/callback")
@explained
async def callback(request: Request) -> Response:
    smart = _smart(request)
    state = _param(request, "state")
    launched = smart.launch_of(request)
    if launched is None or not state or not smart.state_matches(launched, state):
        raise bad_state()
    if not await smart.spend(launched):
        raise bad_state()
    error = _param(request, "error")
    if error:
        said = error if error.replace("_", "").isalnum() and len(error) <= 60 else "an error"
        raise Problem(403, "The EHR did not authorise the app",
                      f"Its authorisation server answered {said}.",
                      "Open the app again from the card to retry, or ask the EHR's "
                      "administrators whether this app is allowed for you.")
    code = _param(request, "code")
    if not code:
        raise bad_state()
    client_id = smart.settings.smart_client_id
    async with smart.outbound() as out:
        grant, id_token = await exchange(out, launched.token_endpoint, code=code,
                                         redirect_uri=launched.redirect_uri,
                                         client_id=client_id, verifier=launched.verifier,
                                         requested_scope=smart.settings.smart_scopes)
    if id_token:  # the keys that sign it: from the SMART configuration
        config = await _configuration(smart, launched.iss)
        async with smart.outbound() as out:
            signed = await signed_in_user(out, config, id_token, client_id, launched.iss)
        grant = dataclasses.replace(grant, user=signed.user, user_problem=signed.problem)
    response = RedirectResponse("questions", status_code=303, headers=HEADERS)
    await smart.sign_in(response, request, launched, grant)
    return response


async def _granted(request: Request) -> tuple[SmartApp, Session]:
    smart = _smart(request)
    session = await smart.load(request)
    if session is None or session.grant is None:
        raise expired()
    return smart, session


@router.get("/questions")
@explained
async def questions(request: Request) -> Response:
    smart, session = await _granted(request)
    grant = session.grant
    assert grant is not None
    engine = smart.engine
    context = parse_app_context(grant.app_context, grant.fhir_context, _param(request, "order"))
    async with smart.outbound() as out:
        if context is None:  # launched without an order (a menu): offer the patient's
            found = await lumbar_orders(out, session.row.iss, grant, engine.knowledge)
            return page(orders_page(found))
        chart = await read_chart(out, session.row.iss, grant, context, engine.knowledge)
    result = rate(engine, chart, smart.clock())
    asked = context.questions(engine.questions, rated=result)
    shown = prefill(asked, result.facts)
    return page(questions_page(QuestionsView(
        chart.patient_label, _order_line(result.procedure.name, chart),
        rating_view(engine, result, chart), asked, dict(shown), shown,
        smart.keys.csrf(session.id), notice=_no_practitioner(grant),
        chosen=context.order_id if context.chosen else None, unread=chart.unread,
        why=why_line(engine, result, asked))))


def _order_line(name: str, chart: Chart) -> str:
    return f"{name} (not saved yet)" if chart.draft else name


def _no_practitioner(grant: Grant) -> Notice | None:
    """Said when no practitioner is known to be signed in: answers saved then carry no
    author, and are read as not a clinician's (they change no rating)."""
    if grant.user:
        return None
    why = ("the EHR did not say which practitioner is signed in (no fhirUser)"
           if grant.user_problem in (None, "no id_token")
           else f"the sign-in could not be verified ({grant.user_problem})")
    return Notice("info", "Your answers will not count as a clinician's",
                  f"{why[0].upper()}{why[1:]}, so answers saved here have no author and are "
                  "read as patient-reported: they change no rating. Record them in the chart, "
                  "or ask the EHR's administrators to send a verifiable fhirUser.")


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Problem(413, "Too much in the form", "The form sent is larger than any answer "
                      "to these questions can be.", "Reload the page and answer again.")
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=200)
    except ValueError:
        pairs = []
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


@router.post("/questions")
@explained
async def answer(request: Request) -> Response:
    """"Update rating" re-rates with the answers on the form; "Save answers" writes them first
    and only then reads the record to show the rating: a failed read, or a rating that cannot
    be drawn, never loses the answers."""
    smart, session = await _granted(request)
    grant = session.grant
    assert grant is not None
    form = await _form(request)
    if not smart.keys.csrf_ok(session.id, form.get("csrf")):
        raise Problem(403, "The answers could not be accepted",
                      "The form did not carry this session's check value (it may come from an "
                      "older page or another site).", "Reload the page and answer again.")
    engine, now = smart.engine, smart.clock()
    context = parse_app_context(grant.app_context, grant.fhir_context, form.get("order"))
    if context is None:
        raise Problem(400, "No order to rate", "The form did not say which order it answers.",
                      "Reload the page and choose the order again.")
    asked = context.questions(engine.questions, form=form)
    answers, problems = parse_form(engine.questions, form, [q.link_id for q in asked])
    response = build_response(engine.questions, smart.settings.canonical_root, answers,
                              grant.patient, now, order_reference=context.order_reference,
                              author=grant.user, encounter=grant.encounter)
    values = {q.link_id: form.get(q.link_id, "").strip() for q in asked}
    save = form.get("action") == "save" and not problems
    async with smart.outbound() as out:
        written = await _write(smart, out, session, response) if save else None
        view = await _view(smart, out, session, context, asked, values, response)
    view.problems = problems
    view.notice = _no_practitioner(grant)
    if written is None:
        return page(questions_page(view), 400 if problems else 200)
    view.notice, status = written
    if status != 200:
        return page(questions_page(view), status)
    view.messages = _messages(smart, grant, view)
    if view.messages is not None and grant.user:  # the EHR is sent the order re-rated
        view.notice = Notice("saved", "Saved. The order is re-rated with your answers.",
                             "The answers are in the patient's record as a questionnaire "
                             "response; the EHR is sent the rating below.")
    return page(saved_page(view))


async def _view(smart: SmartApp, out: Outbound, session: Session, context: AppContext,
                asked: list[Question], values: dict[str, str],
                response: dict[str, Any]) -> QuestionsView:
    """The page's view with the answers on the form: the rating they give, or why none can
    be shown (the order or the record could not be read, or the rating not drawn)."""
    grant = session.grant
    assert grant is not None
    engine, now = smart.engine, smart.clock()
    csrf = smart.keys.csrf(session.id)
    chosen = context.order_id if context.chosen else None
    procedure = engine.knowledge.procedures.get(context.procedure or "")
    name = procedure.name if procedure else "This order"
    try:
        chart = await read_chart(out, session.row.iss, grant, context, engine.knowledge)
        before, after = rate(engine, chart, now), rate(engine, chart, now, response)
        return QuestionsView(chart.patient_label, _order_line(after.procedure.name, chart),
                             rating_view(engine, after, chart), asked, values,
                             prefill(asked, before.facts), csrf, chosen=chosen,
                             unread=chart.unread, rated=after,
                             why=why_line(engine, before, asked))
    except Problem as problem:
        why = f"{problem.title}: {problem.text}"
    except Exception as exc:  # the answers are kept (and saved) whatever the rating does
        log.error("app rating not drawn", extra={"error": type(exc).__name__})
        why = "the rating could not be drawn for these answers."
    return QuestionsView("the patient the EHR opened the app for", name,
                         unavailable_view(name, why), asked, values, {}, csrf, chosen=chosen)


async def _write(smart: SmartApp, out: Outbound, session: Session,
                 response: dict[str, Any]) -> tuple[Notice, int]:
    """Write the QuestionnaireResponse to the EHR (when the scope allows): what to say, and
    the page's status."""
    grant = session.grant
    assert grant is not None
    if not can_write_responses(grant.scope):
        return Notice("error", "Not saved: the EHR did not grant the app the right to "
                      "save answers",
                      "The scope patient/QuestionnaireResponse.c was not granted. The "
                      "rating below uses your answers; record them in the chart, or ask "
                      "the EHR's administrators to grant the scope."), 403
    reply: Any = "not-allowed"
    if server_allowed(session.row.iss, smart.policy):
        reply = await out.send(
            "POST", f"{normalize_base(session.row.iss)}/QuestionnaireResponse",
            content=orjson.dumps(response),
            headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal",
                     "Authorization": f"Bearer {grant.access_token}"})
    if isinstance(reply, str) or reply.status not in (200, 201):
        fault = reply if isinstance(reply, str) else f"HTTP {reply.status}"
        log.warning("app answers not saved", extra={"fault": fault})
        return Notice("error", "Not saved",
                      f"The EHR's FHIR server did not accept the answers ({fault}). They "
                      "are still on the form below: save again, or record them in the "
                      "chart."), 502
    if not grant.user:
        return Notice("saved", "Saved, without an author", "The answers are in the "
                      "patient's record as a questionnaire response, but no practitioner is "
                      "known to be signed in: they are read as patient-reported and do not "
                      "change the rating."), 200
    return Notice("saved", "Saved. Close this window; the order is rated with these answers "
                  "when you next select or sign it.", "The answers are in the patient's "
                  "record as a questionnaire response; the rating below is the one they "
                  "give."), 200


def _messages(smart: SmartApp, grant: Grant, view: QuestionsView) -> Messages | None:
    """SMART Web Messaging for the EHR that offers it: the order re-rated, then done."""
    if not grant.messaging_origin or view.rated is None or not view.rated.decision.pama:
        return None
    return Messages(grant.messaging_origin, grant.messaging_handle,
                    rerated_order(smart.engine, view.rated))


@router.get("/app.js")
async def script() -> Response:
    return Response(SCRIPT, media_type="text/javascript",
                    headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})
