"""Start-up checks: knowledge and card templates are validated before any request."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cds_service.app import ConfigurationError, create_app
from cds_service.knowledge import KNOWLEDGE_DIR, KnowledgeError, load_knowledge
from cds_service.render import TemplateProblem, load_templates
from cds_service.settings import Settings
from tests.conftest import ROOT, dev_settings


def copy_dir(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def test_broken_template_fails_the_start(tmp_path: Path) -> None:
    cards = copy_dir(ROOT / "cards", tmp_path, "cards")
    path = cards / "not-appropriate.yaml"
    path.write_text(path.read_text().replace("{{ order.name }}", "{{ order.name ", 1))
    with pytest.raises(TemplateProblem, match="not-appropriate"):
        load_templates(cards)
    with pytest.raises(TemplateProblem):
        create_app(dev_settings(cards_dir=cards))


def test_template_with_unknown_variable_fails_the_start(tmp_path: Path) -> None:
    cards = copy_dir(ROOT / "cards", tmp_path, "cards")
    path = cards / "recent-mri.yaml"
    path.write_text(path.read_text().replace("{{ recent.date }}", "{{ recent.when }}", 1))
    with pytest.raises(TemplateProblem, match="recent-mri"):
        load_templates(cards)


def test_missing_card_kind_fails_the_start(tmp_path: Path) -> None:
    cards = copy_dir(ROOT / "cards", tmp_path, "cards")
    (cards / "mri-safety.yaml").unlink()
    with pytest.raises(TemplateProblem, match="mri-safety"):
        load_templates(cards)


def test_override_reason_without_display_fails(tmp_path: Path) -> None:
    cards = copy_dir(ROOT / "cards", tmp_path, "cards")
    path = cards / "cauda-equina.yaml"
    path.write_text(path.read_text().replace('display: "The record used here is incomplete or '
                                             'wrong"', "x: y"))
    with pytest.raises(TemplateProblem, match="display"):
        load_templates(cards)


def test_edited_wording_appears_without_code_change(tmp_path: Path) -> None:
    cards = copy_dir(ROOT / "cards", tmp_path, "cards")
    path = cards / "common.yaml"
    path.write_text(path.read_text().replace("Usually not appropriate", "Rarely indicated"))
    templates = load_templates(cards)
    assert templates.categories["UNA"] == "Rarely indicated"


def test_unverified_code_is_refused(tmp_path: Path) -> None:
    know = copy_dir(KNOWLEDGE_DIR, tmp_path, "knowledge")
    for extra in know.glob("*.py"):
        extra.unlink()
    path = know / "valuesets.yaml"
    path.write_text(path.read_text().replace(
        '{system: icd10cm, code: G83.4, display: Cauda equina syndrome, source: ICD-10-CM '
        'FY2026, verified: yes}',
        '{system: icd10cm, code: G83.4, source: ICD-10-CM FY2026, verified: yes}\n'
        '      - {system: snomed, code: "12345", source: guess, verified: no}'))
    with pytest.raises(KnowledgeError, match="unverified"):
        load_knowledge(know)


def test_code_without_source_is_refused(tmp_path: Path) -> None:
    know = copy_dir(KNOWLEDGE_DIR, tmp_path, "knowledge")
    path = know / "procedures.yaml"
    path.write_text(path.read_text().replace(
        '{system: cpt, code: "72148", source: CPT 2026}', '{system: cpt, code: "72148"}'))
    with pytest.raises(KnowledgeError, match="source"):
        load_knowledge(know)


@pytest.mark.parametrize(("filename", "old", "new", "match"), [
    ("valuesets.yaml", "{system: icd10cm, code: R33.9, display: Retention of urine, source: "
     "ICD-10-CM FY2026, verified: yes}", "{system: icd10cm, code: R33.9, verified: yes}",
     "source"),
    ("valuesets.yaml", "prefix: C44, source: \"ICD-10-CM FY2026 (other malignant neoplasm of "
     "skin, non-melanoma)\", verified: yes", "prefix: C44, verified: yes", "source"),
    ("valuesets.yaml", "needs_companion: [ces_bladder_bowel]", "needs_companion: [bladder]",
     "unknown value set"),
    ("valuesets.yaml", "  source: WHO ATC classes", "  origin: WHO ATC classes",
     "medication_terms"),
    ("procedures.yaml", '{system: cpt, code: "62284", source: "CPT 2026 (injection for '
     'myelography and/or CT, lumbar)"}', '{system: cpt, code: "62284"}', "source"),
    ("procedures.yaml", "becomes: ct-myelo", "becomes: ct-myelogram", "procedures"),
])
def test_new_knowledge_fields_are_checked(tmp_path: Path, filename: str, old: str, new: str,
                                          match: str) -> None:
    know = copy_dir(KNOWLEDGE_DIR, tmp_path, "knowledge")
    path = know / filename
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(KnowledgeError, match=match):
        load_knowledge(know)


def test_incomplete_rating_row_is_refused(tmp_path: Path) -> None:
    know = copy_dir(KNOWLEDGE_DIR, tmp_path, "knowledge")
    path = know / "ratings.yaml"
    path.write_text(path.read_text().replace("mri-w:       [UNA, UNA, UNA, UNA, UNA, UNA, UNA]",
                                             "mri-w:       [UNA, UNA]"))
    with pytest.raises(KnowledgeError, match="mri-w"):
        load_knowledge(know)


def test_site_knowledge_dir_is_used(tmp_path: Path) -> None:
    know = copy_dir(KNOWLEDGE_DIR, tmp_path, "knowledge")
    path = know / "ratings.yaml"
    path.write_text(path.read_text().replace("mri-w:       [UNA, UNA, UNA",
                                             "mri-w:       [UNA, UNA, MBA"))
    assert load_knowledge(know).ratings["mri-w"]["V3"] == "MBA"


def test_production_refuses_to_start_and_names_what_is_missing() -> None:
    with pytest.raises(ConfigurationError,
                       match="CDS_TRUSTED_ISSUERS_FILE and CDS_AUDIT_HASH_KEY are required"):
        create_app(Settings(env="production"))
    with pytest.raises(ConfigurationError, match="CDS_TRUSTED_ISSUERS_FILE is required"):
        create_app(Settings(env="test", audit_hash_key="k" * 32))


def test_unreadable_trusted_issuers_file(tmp_path: Path) -> None:
    bad = tmp_path / "issuers.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigurationError, match="CDS_TRUSTED_ISSUERS_FILE"):
        create_app(Settings(env="production", trusted_issuers_file=bad,
                            audit_hash_key="k" * 32))


def test_production_refuses_to_start_without_audit_hash_key(tmp_path: Path) -> None:
    issuers = tmp_path / "issuers.json"
    issuers.write_text('[{"iss": "https://ehr.example", "jwks": {"keys": []}}]')
    with pytest.raises(ConfigurationError, match="CDS_AUDIT_HASH_KEY"):
        create_app(Settings(env="production", trusted_issuers_file=issuers))


def test_development_mode_announces_itself(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    logger = logging.getLogger("cds_service")
    logger.propagate = True
    with caplog.at_level("WARNING", logger="cds_service"):
        create_app(dev_settings())
    assert any("DEVELOPMENT MODE" in r.getMessage() for r in caplog.records)


def test_a_value_set_the_rules_read_cannot_be_renamed_away(tmp_path: Path) -> None:
    """Renaming cauda_equina in a site copy would make the red flag match nothing (a critical
    card would become an info card): the service refuses to start instead, naming it."""
    knowledge = tmp_path / "knowledge"
    shutil.copytree(KNOWLEDGE_DIR, knowledge, ignore=shutil.ignore_patterns("*.py"))
    path = knowledge / "valuesets.yaml"
    path.write_text(path.read_text().replace("\n  cauda_equina:\n", "\n  cauda_equina_x:\n", 1))
    with pytest.raises(KnowledgeError, match="is .cauda_equina_x. a misspelling of it"):
        create_app(dev_settings(knowledge_dir=knowledge))
