"""Issue 14: the questions as data, the published Questionnaire, and a clinician's answers
(QuestionnaireResponses) as evidence: they settle what the record leaves silent, never a coded
red flag, and only when given for this episode."""

from __future__ import annotations

import copy
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.questionnaire import Questionnaire
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse

from cds_service.app import create_app
from cds_service.knowledge import KNOWLEDGE_DIR, KnowledgeError
from cds_service.questionnaire import build_response, load_questions
from cds_service.settings import DEV_BASE_URL
from tests.builders import bundle, condition, hook_request, order, seed_prefetch
from tests.conftest import FIXTURE_NOW, FIXTURES, SELECT, ValidatingClient, dev_settings

QUESTIONS = load_questions()
QUESTIONNAIRE = f"{DEV_BASE_URL}/fhir/Questionnaire/lbp-imaging-auc"
NONE_OF_THEM = {"cauda-equina": False, "neuro-deficit": False, "cancer": False,
                "infection": False, "immunosuppression": False, "trauma": False,
                "osteoporosis": False, "steroids": False, "prior-lumbar-surgery": False,
                "mri-unsafe-device": False}
CORE = {"pain-duration": "chronic", "conservative-care": True, "conservative-care-weeks": 8,
        "intervention-candidate": True, **NONE_OF_THEM}


def fixture(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / "requests" / f"{name}.json").read_text())
    return body


def response(answers: dict[str, Any], *, days_ago: int = 1, rid: str = "qr-1",
             patient: str = "seed",
             author: str | None = "Practitioner/dr-seed") -> dict[str, Any]:
    """A completed response; by default a clinician's (authored by a Practitioner)."""
    authored = FIXTURE_NOW.replace(hour=10) - timedelta(days=days_ago)
    qr = build_response(QUESTIONS, DEV_BASE_URL, answers, patient, authored,
                        "ServiceRequest/order-1", author=author)
    qr["id"] = rid
    return qr


def with_answers(body: dict[str, Any], *responses: dict[str, Any]) -> dict[str, Any]:
    """The body with the responses in its prefetch, made out to the body's patient."""
    body = copy.deepcopy(body)
    for qr in responses:
        qr["subject"] = {"reference": f"Patient/{body['context']['patientId']}"}
    body.setdefault("prefetch", {})["questionnaireresponses"] = bundle(*responses)
    return body


@pytest.fixture
def client() -> Any:
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        yield c


def rating(answer: Any) -> tuple[str, str | None]:
    ext = answer.json()["systemActions"][0]["resource"]["extension"]
    codings = next(e for e in ext if e["url"].endswith("pama-rating"))
    coding = codings["valueCodeableConcept"]["coding"]
    return coding[0]["code"], coding[1]["code"] if len(coding) > 1 else None


# ------------------------------------------------------------------ the Questionnaire


def test_the_questionnaire_is_served_valid_and_generated_from_the_knowledge(client: Any) -> None:
    r = client.get("/fhir/Questionnaire/lbp-imaging-auc")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    q = Questionnaire.model_validate(r.json())  # valid FHIR (R4B)
    assert q.url == QUESTIONNAIRE and q.version == QUESTIONS.version and q.status == "active"
    assert [i.linkId for i in q.item] == [x.link_id for x in QUESTIONS.items]
    weeks = next(i for i in q.item if i.linkId == "conservative-care-weeks")
    assert weeks.type == "integer"
    assert weeks.enableWhen[0].question == "conservative-care"
    assert weeks.enableWhen[0].answerBoolean is True
    duration = next(i for i in q.item if i.linkId == "pain-duration")
    system = duration.answerOption[0].valueCoding.system
    answers = client.get(system.removeprefix(DEV_BASE_URL))  # its code system resolves
    assert answers.status_code == 200
    codes = {c.code for c in CodeSystem.model_validate(answers.json()).concept}
    assert codes == {"acute", "subacute", "chronic"}
    assert client.get("/fhir/Questionnaire/other").status_code == 404


def test_the_questionnaire_is_found_by_its_canonical_url(client: Any) -> None:
    """Issue 23 item 10: EHR form renderers look a questionnaire up by ``url``."""
    for url in (QUESTIONNAIRE, f"{QUESTIONNAIRE}|{QUESTIONS.version}"):
        r = client.get("/fhir/Questionnaire", params={"url": url})
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "application/fhir+json")
        found = Bundle.model_validate(r.json())
        assert found.type == "searchset" and found.total == 1
        assert found.entry[0].resource.url == QUESTIONNAIRE
        assert found.entry[0].fullUrl == QUESTIONNAIRE
    for url in (f"{QUESTIONNAIRE}-other", f"{QUESTIONNAIRE}|0.0.0-not"):
        none = client.get("/fhir/Questionnaire", params={"url": url}).json()
        assert none["type"] == "searchset" and none["total"] == 0 and none["entry"] == []


def test_a_questionnaire_response_we_build_is_valid_fhir() -> None:
    QuestionnaireResponse.model_validate(response(CORE))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("fact: cancer", "fact: cancr"), "fact must be one of"),
    (lambda t: t.replace("linkId: infection", "linkId: cancer"), "unique"),
    (lambda t: t.replace("type: integer", "type: decimal"), "type must be"),
    (lambda t: t.replace("question: conservative-care,", "question: nope,"), "enable_when"),
])
def test_a_broken_question_is_refused_at_load(tmp_path: Path, edit: Any, message: str) -> None:
    shutil.copytree(KNOWLEDGE_DIR, tmp_path / "k", ignore=shutil.ignore_patterns("*.py"))
    path = tmp_path / "k" / "questions.yaml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(KnowledgeError, match=message):
        load_questions(tmp_path / "k")


# ------------------------------------------------------------------ answers as evidence


def test_answers_rate_an_order_the_record_cannot(client: Any) -> None:
    """No prefetch at all: 412; with the clinician's answers alone: rated, saying so."""
    body = fixture("unknown-none-mri-wo")
    assert client.post(SELECT, json=body).status_code == 412
    answered = with_answers(body, response(CORE))
    r = client.post(SELECT, json=answered)
    assert r.status_code == 200, r.text
    assert rating(r) == ("appropriate", "UA")  # MRI without contrast, core scenario (V3)
    # a determinate rating with nothing to add: no card (the rating is in systemActions)
    assert r.json()["cards"] == []


def test_an_answered_red_flag_rates_and_is_shown_as_attested(client: Any) -> None:
    """MRI with and without contrast, no record: MBA in the core scenario, UA with cancer."""
    body = hook_request(order("order-1", cpt="72158"), prefetch={})
    r = client.post(SELECT, json=with_answers(body, response({**CORE, "cancer": True})))
    assert r.status_code == 200
    assert rating(r) == ("appropriate", "UA")  # V7
    r = client.post(SELECT, json=with_answers(body, response(CORE)))
    assert rating(r) == ("appropriate", "MBA")  # V3
    r = client.post(SELECT, json=with_answers(fixture("unknown-none-mri-w"), response(CORE)))
    assert rating(r) == ("not-appropriate", "UNA")
    detail = r.json()["cards"][0]["detail"]
    assert "Pain for more than 12 weeks (clinician-attested on 2026-10-31)" in detail
    assert "| clinician-attested: no (cancer) | Cancer | 2026‑10‑31, answers |" in detail
    assert "**MRI safety**" not in detail  # an answer of no is not a device


def test_a_coded_red_flag_still_counts_when_the_answer_says_none(client: Any) -> None:
    pre = seed_prefetch(FIXTURE_NOW)
    base = hook_request(order("order-1", cpt="72158"), prefetch=pre)
    assert rating(client.post(SELECT, json=base)) == ("appropriate", "MBA")
    pre["conditions"]["entry"].append({"resource": condition(
        "ca-1", "C79.51", "2026-09-01")})  # bone metastasis, coded
    coded = hook_request(order("order-1", cpt="72158"), prefetch=pre)
    r = client.post(SELECT, json=with_answers(coded, response({**CORE, "cancer": False})))
    assert r.status_code == 200
    assert rating(r) == ("appropriate", "UA")  # the coded cancer decides (V7)
    # on a card (MRI with contrast only: not appropriate in any scenario), the conflict is said
    coded = hook_request(order("order-1", cpt="72149"), prefetch=pre)
    r = client.post(SELECT, json=with_answers(coded, response({**CORE, "cancer": False})))
    detail = r.json()["cards"][0]["detail"]
    assert "C79.51" in detail and "the coded finding still counts" in detail


@pytest.mark.parametrize("change", [
    lambda qr: qr.update(status="in-progress"),
    lambda qr: qr.update(questionnaire="http://other.example/Questionnaire/x"),
    lambda qr: qr.update(authored="2026-08-01T10:00:00Z"),  # older than 30 days
    lambda qr: qr.pop("authored"),
])
def test_answers_that_do_not_count_leave_the_record_as_it_was(client: Any,
                                                              change: Any) -> None:
    qr = response(CORE)
    change(qr)
    r = client.post(SELECT, json=with_answers(fixture("unknown-none-mri-wo"), qr))
    assert r.status_code == 412  # as without any answer


def test_an_answer_given_before_this_episode_began_does_not_count() -> None:
    """The seed chart dates this episode; an answer from before its onset is another
    episode's (even within the validity window)."""
    pre = seed_prefetch(FIXTURE_NOW)
    onset = min(e["resource"]["onsetDateTime"] for e in pre["conditions"]["entry"]
                if e["resource"]["code"]["coding"][0]["code"].startswith("M54"))
    base = hook_request(order("order-1", cpt="72158"), prefetch=pre)  # MRI w/wo
    before, after = response({"cancer": True}), response({"cancer": True})
    before["authored"] = f"{int(onset[:4]) - 1}{onset[4:10]}T10:00:00Z"
    settings = dev_settings(answer_valid_days=3650)
    with ValidatingClient(create_app(settings, clock=lambda: FIXTURE_NOW)) as c:
        plain = rating(c.post(SELECT, json=base))
        assert plain == ("appropriate", "MBA")
        assert rating(c.post(SELECT, json=with_answers(base, before))) == plain
        assert rating(c.post(SELECT, json=with_answers(base, after))) == ("appropriate", "UA")


def test_the_latest_answer_wins(client: Any) -> None:
    body = hook_request(order("order-1", cpt="72158"), prefetch={})
    earlier = response({**CORE, "cancer": True}, days_ago=3, rid="qr-old")
    later = response(CORE, days_ago=1, rid="qr-new")
    assert rating(client.post(SELECT, json=with_answers(body, earlier, later))) == \
        ("appropriate", "MBA")
    assert rating(client.post(SELECT, json=with_answers(body, later, earlier))) == \
        ("appropriate", "MBA")  # by date, not by position


# ------------------------------------------------------------------ the card's app link


def test_the_missing_data_card_links_to_the_questions_that_decide(client: Any) -> None:
    card = client.post(SELECT, json=fixture("candidate-without-recorded-care-mri-wo")
                       ).json()["cards"][0]
    link = card["links"][0]
    assert link["type"] == "smart" and link["url"] == f"{DEV_BASE_URL}/app/launch"
    context = json.loads(link["appContext"])
    assert context == {"order": "ServiceRequest/order-1", "procedure": "mri-wo",
                       "ask": ["conservative-care", "conservative-care-weeks"]}
    assert link["label"] == "Answer 2 questions to rate this order"
    # answered: the card and its link are gone, the order is rated
    answered = with_answers(fixture("candidate-without-recorded-care-mri-wo"), response(
        {"conservative-care": True, "conservative-care-weeks": 9}))
    r = client.post(SELECT, json=answered)
    assert rating(r) == ("appropriate", "UA") and r.json()["cards"] == []


def test_with_the_app_off_no_link_is_sent() -> None:
    body = fixture("unknown-none-mri-w")
    with ValidatingClient(create_app(dev_settings(smart_app_enabled=False),
                                     clock=lambda: FIXTURE_NOW)) as c:
        cards = c.post(SELECT, json=body).json()["cards"]
    assert cards and all("links" not in card for card in cards)
    with ValidatingClient(create_app(dev_settings(), clock=lambda: FIXTURE_NOW)) as c:
        card = c.post(SELECT, json=body).json()["cards"][0]
        # the EHR sent no history: its gap, not a question for the clinician
        assert "links" not in card
        card = c.post(SELECT, json=fixture("unknown-fusion-site-mri-w")).json()["cards"][0]
    # rated not appropriate in every scenario: the answers find the study, not the rating
    assert card["links"][0]["label"] == "Answer 1 question to find the study that fits"
