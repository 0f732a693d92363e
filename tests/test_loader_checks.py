"""The loaders are the one guard: a mistake in a knowledge or card file stops the start with a
message naming the file, the entry and the fix; the shipped files load unchanged.

Each case edits a site copy of the files (as a clinical informaticist would) and loads it as the
service does (``load_knowledge(dir)``, ``load_templates(dir)``, ``load_questions(dir)``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from cds_service import render as render_module
from cds_service.clinical.registry import VALUESETS_READ
from cds_service.engine import Engine
from cds_service.errors import StartupError
from cds_service.knowledge import KNOWLEDGE_DIR, KnowledgeError, load_knowledge, require_valuesets
from cds_service.knowledge import doc as checks_doc
from cds_service.protocol import HookRequest
from cds_service.questionnaire import load_questions
from cds_service.record import record_from_prefetch
from cds_service.render import (
    SUMMARY_LIMIT,
    CardTemplates,
    TemplateProblem,
    load_templates,
    sample_context,
)
from tests.conftest import FIXTURE_NOW, FIXTURES, ROOT, dev_settings

READER = "cds_service/clinical/registry.py (VALUESETS_READ)"


def edited(tmp_path: Path, folder: str, file: str, old: str, new: str) -> tuple[Path, Path]:
    """A site copy of the knowledge and the cards, with one edit; (file, its folder)."""
    source = KNOWLEDGE_DIR if folder == "knowledge" else ROOT / "cards"
    copy = tmp_path / folder
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    path = copy / file
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} is no longer in {file}: update the test"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path, copy


def assert_names(exc: StartupError, *parts: str) -> None:
    message = str(exc)
    for part in parts:
        assert part in message, f"{part!r} not in the message:\n{message}"


# ------------------------------------------------------------------ the shipped files


def test_the_shipped_knowledge_and_cards_load() -> None:
    knowledge = load_knowledge()
    require_valuesets(knowledge, VALUESETS_READ, READER)
    assert len(knowledge.procedures) == 11
    assert len(load_questions().items) == 14
    templates = load_templates(ROOT / "cards")
    assert set(templates.phrases) and templates.source["label"]


def test_no_value_set_the_rules_read_is_missing() -> None:
    assert VALUESETS_READ <= set(load_knowledge().valueset_descriptions)


# ------------------------------------------------------------------ (a) value-set ids


def test_a_misspelled_value_set_id_is_refused(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "valuesets.yaml", "\n  cauda_equina:\n",
                        "\n  cauda_equnia:\n")
    knowledge = load_knowledge(know)  # (the knowledge alone cannot tell: the rules read ids)
    with pytest.raises(KnowledgeError) as caught:
        require_valuesets(knowledge, VALUESETS_READ, READER)
    assert_names(caught.value, f"{path}: valuesets: ", "no value set 'cauda_equina'", READER,
                 "is 'cauda_equnia' a misspelling of it? Rename it back")


def test_a_missing_value_set_without_a_near_name_says_to_add_it(tmp_path: Path) -> None:
    knowledge = load_knowledge()
    with pytest.raises(KnowledgeError) as caught:
        require_valuesets(knowledge, ["zz_not_there"], "a reader")
    assert_names(caught.value, "valuesets.yaml: valuesets: no value set 'zz_not_there'",
                 "add it, or rename back the set that holds its codes")


def test_a_misspelled_companion_value_set_is_refused(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "valuesets.yaml",
                        "needs_companion: [ces_bladder_bowel]",
                        "needs_companion: [ces_bladder_bowl]")
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, f"{path}: valuesets.ces_sensory.needs_companion: ",
                 "'ces_bladder_bowl'", "did you mean 'ces_bladder_bowel'?")


# ------------------------------------------------------------------ (b) phrase placeholders


@pytest.mark.parametrize(("old", "new", "where", "fix"), [
    ('care-done: "{weeks} weeks', 'care-done: "{wekes} weeks', "phrases.care-done",
     "placeholder {wekes} here: did you mean {weeks}?"),
    ('duration: "Pain for {span}"', 'duration: "Pain for {weeks}"', "phrases.duration",
     "placeholder {weeks} here: this one may use {span}"),
    ('urgent: "ordered as urgent"', 'urgent: "ordered as urgent {span}"', "phrases.urgent",
     "this one takes no placeholder"),
    ('"pain duration counted from the date', '"pain duration ({weeks}) counted from the date',
     "assumptions.duration-from-recorded-date", "this one takes no placeholder"),
    ('care-done: "{weeks} weeks', 'care-done: "{} weeks', "phrases.care-done",
     "name each placeholder"),
    ('on-record: "on record: {found}"', 'on-record: "on record: {finding}"',
     "phrases.on-record", "placeholder {finding} here: this one may use {found}"),
])
def test_a_placeholder_the_engine_does_not_fill_is_refused(tmp_path: Path, old: str, new: str,
                                                            where: str, fix: str) -> None:
    path, cards = edited(tmp_path, "cards", "common.yaml", old, new)
    with pytest.raises(TemplateProblem) as caught:
        load_templates(cards)
    assert_names(caught.value, f"{path}: {where}: ", fix)


def test_a_misspelled_phrase_code_is_refused(tmp_path: Path) -> None:
    path, cards = edited(tmp_path, "cards", "common.yaml", "  no-red-flags:", "  no-red-flag:")
    with pytest.raises(TemplateProblem) as caught:
        load_templates(cards)
    assert_names(caught.value, f"{path}: phrases: 'no-red-flag' is not one of the engine's "
                               "phrases: did you mean 'no-red-flags'?")


def test_a_misspelled_category_is_refused(tmp_path: Path) -> None:
    path, cards = edited(tmp_path, "cards", "common.yaml", "  MBA(D): May", "  MBA (D): May")
    with pytest.raises(TemplateProblem) as caught:
        load_templates(cards)
    assert_names(caught.value, f"{path}: categories: 'MBA (D)' is not an ACR category: "
                               "did you mean 'MBA(D)'?")


# ------------------------------------------------------------------ (c) order codes


def test_an_order_code_not_among_the_codes_is_refused(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "procedures.yaml",
                        '      - {system: cpt, code: "72148"}\n',
                        '      - {system: cpt, code: "72147"}\n')
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, f"{path}: procedures[1] (mri-wo).order_codes[0] (72147): ",
                 "order code 72147 (cpt) is not among the codes of 'mri-wo'",
                 "add it to its codes with a source, or correct the order code",
                 "did you mean '72148'?")


def test_an_order_code_of_another_procedure_is_refused(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "procedures.yaml",
                        '      - {system: cpt, code: "72148"}\n',
                        '      - {system: cpt, code: "72149"}\n')
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, f"{path}: procedures[1] (mri-wo).order_codes[0] (72149): ",
                 "(it is a code of 'mri-w')")


# ------------------------------------------------------------------ (d) system keys


@pytest.mark.parametrize(("file", "old", "new", "where", "fix"), [
    ("procedures.yaml", '      - {system: cpt, code: "72148", source: CPT 2026}',
     '      - {system: cpy, code: "72148", source: CPT 2026}',
     "procedures[1] (mri-wo).codes[0] (72148)", "did you mean 'cpt'?"),
    ("procedures.yaml", '      - {system: cpt, code: "72148"}\n',
     '      - {system: cpy, code: "72148"}\n',
     "procedures[1] (mri-wo).order_codes[0] (72148)", "did you mean 'cpt'?"),
    ("valuesets.yaml", "{system: icd10cm, code: G83.4,", "{system: icd10, code: G83.4,",
     "valuesets.cauda_equina.entries[0] (G83.4)", "did you mean 'icd10cm'?"),
])
def test_a_misspelled_system_key_is_refused(tmp_path: Path, file: str, old: str, new: str,
                                            where: str, fix: str) -> None:
    path, know = edited(tmp_path, "knowledge", file, old, new)
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, f"{path}: {where}: ", "is neither a key of systems nor a URL",
                 fix)


# ------------------------------------------------------------------ (e) summaries

BETTER = "better-alternative.yaml"


def _summary_of(file: str) -> str:
    """The summary block of a card kind's file, as written (``summary: >-`` and its lines)."""
    text = (ROOT / "cards" / file).read_text()
    start = text.index("summary:")
    end = text.index("\ndetail:", start)
    return text[start:end]


def test_a_summary_that_can_exceed_the_limit_is_refused(tmp_path: Path) -> None:
    """Each value counted at its longest (the longest short name of a study here): the summary
    can reach 166 characters, though it fits with most studies; refused at start-up, naming
    the file, the key and what makes it long."""
    long = ('summary: "{{ conditional }}{{ suggestion.short }} is usually the first choice '
            'here, rated higher than {{ order.short }} for this scenario"')
    path, cards = edited(tmp_path, "cards", BETTER, _summary_of(BETTER), long)
    with pytest.raises(TemplateProblem) as caught:
        Engine(load_knowledge(), load_templates(cards), dev_settings())
    assert_names(caught.value, f"{path}: summary: can reach 166 characters",
                 f"over the {SUMMARY_LIMIT} allowed", "29 suggestion.short", "29 order.short",
                 "37 conditional")


def test_a_summary_counts_the_longest_branch(tmp_path: Path) -> None:
    short = ('summary: "{% if suggestion %}Consider {{ suggestion.short }}{% else %}'
             + "x" * 140 + '{% endif %}"')
    path, cards = edited(tmp_path, "cards", BETTER, _summary_of(BETTER), short)
    with pytest.raises(TemplateProblem) as caught:
        Engine(load_knowledge(), load_templates(cards), dev_settings())
    assert_names(caught.value, f"{path}: summary: can reach 140 characters")


def test_a_summary_showing_record_text_is_refused(tmp_path: Path) -> None:
    """The devices as the record words them have no longest value: only the detail shows
    them (a summary names the device by the knowledge's name, ``device_short``)."""
    path, cards = edited(tmp_path, "cards", "mri-safety.yaml", _summary_of("mri-safety.yaml"),
                         'summary: "MRI safety: {{ devices }} on record"')
    with pytest.raises(TemplateProblem) as caught:
        Engine(load_knowledge(), load_templates(cards), dev_settings())
    assert_names(caught.value, f"{path}: summary: {{{{ devices }}}} has no longest value",
                 "device_short")


def test_a_scenario_without_a_short_name_is_refused(tmp_path: Path) -> None:
    path, cards = edited(tmp_path, "cards", "common.yaml",
                         '  V7: "suspected cancer or infection"\n', "")
    with pytest.raises(TemplateProblem) as caught:
        Engine(load_knowledge(), load_templates(cards), dev_settings())
    assert_names(caught.value, f"{path}: scenarios: no short name for V7", "V1, V2")


def test_the_summaries_of_the_cards_fit_at_their_longest() -> None:
    engine = Engine(load_knowledge(), load_templates(ROOT / "cards"), dev_settings())
    bounds = engine.cards.summary_bounds()
    for kind in engine.templates.kinds.values():
        length, _ = render_module._longest(kind.summary_tree, bounds)
        assert length <= SUMMARY_LIMIT, kind.name


def test_at_run_time_a_long_summary_is_still_cut() -> None:
    """The last resort stays (a value longer than its bound, which the check rules out): never
    sent over 139 characters."""
    templates = load_templates(ROOT / "cards")
    ctx = sample_context()
    ctx["order"] = {**ctx["order"], "short": "A very long local name of a procedure " * 3}
    text = templates.render("not-appropriate", "summary", ctx)
    assert text is not None and len(text) == SUMMARY_LIMIT and text.endswith("…")


def test_the_fixture_summaries_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    lengths: dict[str, int] = {}
    current = "(the start-up sample)"
    render = CardTemplates._render

    def measure(template: Any, field_name: str, context: dict[str, Any]) -> str:
        if field_name == "summary":
            text = " ".join(template.render(**context).split())
            lengths[current] = max(lengths.get(current, 0), len(text))
        return render(template, field_name, context)

    monkeypatch.setattr(CardTemplates, "_render", staticmethod(measure))
    engine = Engine(load_knowledge(), load_templates(ROOT / "cards"), dev_settings())
    for path in sorted((FIXTURES / "requests").glob("*.json")):
        current = path.name
        engine.templates._memo.clear()  # (a text memoised for another fixture is measured too)
        request = HookRequest.model_validate(json.loads(path.read_text()))
        engine.evaluate(request, record_from_prefetch(request.prefetch,
                                                      request.context.patientId), FIXTURE_NOW)
    lengths.pop("(the start-up sample)")
    assert len(lengths) > 15  # (the fixtures with cards)
    over = {name: n for name, n in lengths.items() if n > SUMMARY_LIMIT}
    assert over == {}, f"summaries over {SUMMARY_LIMIT} characters: {over}"


# ------------------------------------------------------------------ misspelled keys


@pytest.mark.parametrize(("folder", "file", "old", "new", "where", "fix"), [
    ("knowledge", "valuesets.yaml", "needs_companion: [ces_bladder_bowel]",
     "need_companion: [ces_bladder_bowel]", "valuesets.ces_sensory",
     "unknown key 'need_companion': did you mean 'needs_companion'?"),
    ("knowledge", "procedures.yaml", "    short_name: lumbar X-ray",
     "    shortname: lumbar X-ray", "procedures[0] (xr-lumbar)",
     "unknown key 'shortname': did you mean 'short_name'?"),
    ("knowledge", "ratings.yaml", "V1: {name:", "V1: {nme:", "variants.V1",
     "unknown key 'nme': did you mean 'name'?"),
    ("knowledge", "questions.yaml", "enable_when: {question: conservative-care",
     "enable_wen: {question: conservative-care", "questions[2] (conservative-care-weeks)",
     "unknown key 'enable_wen': did you mean 'enable_when'?"),
    ("cards", "not-appropriate.yaml", "cancel_label:", "cancel_lable:", "",
     "unknown key 'cancel_lable': did you mean 'cancel_label'?"),
    ("cards", "common.yaml", "\nphrases:\n", "\nphrase:\n", "",
     "unknown key 'phrase': did you mean 'phrases'?"),
])
def test_a_misspelled_key_is_refused(tmp_path: Path, folder: str, file: str, old: str,
                                     new: str, where: str, fix: str) -> None:
    path, copy = edited(tmp_path, folder, file, old, new)
    load = {"valuesets.yaml": load_knowledge, "procedures.yaml": load_knowledge,
            "ratings.yaml": load_knowledge, "questions.yaml": load_questions}.get(
        file, load_templates)
    error = KnowledgeError if folder == "knowledge" else TemplateProblem
    with pytest.raises(error) as caught:
        load(copy)
    assert_names(caught.value, f"{path}: {where}: " if where else f"{path}: ", fix)


def test_a_wrong_value_names_the_choices(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "procedures.yaml", "    modality: MR\n",
                        "    modality: MRI\n")
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, f"{path}: procedures[1] (mri-wo): modality must be one of",
                 "not 'MRI': did you mean 'MR'?")


def test_a_missing_key_is_named_with_what_it_holds(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "procedures.yaml", "    rrl: none\n", "")
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, f"{path}: procedures[1] (mri-wo): rrl is required (ACR's "
                               "relative radiation level")


def test_a_comma_in_an_unquoted_value_is_refused(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "procedures.yaml",
                        'source: "CPT 2026 (SPECT/CT, 2+ areas)"',
                        "source: CPT 2026 (SPECT/CT, 2+ areas)")
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, f"{path}: procedures[9] (bone-scan).codes[2] (78832): "
                               "unknown key '2+ areas)'", "put the whole value in quotes")


def test_a_value_set_given_twice_is_refused(tmp_path: Path) -> None:
    path, know = edited(tmp_path, "knowledge", "valuesets.yaml", "\n  weight_loss:\n",
                        "\n  cancer:\n")
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(know)
    assert_names(caught.value, str(path), "the key 'cancer' appears twice")


# ------------------------------------------------------------------ the page


def test_the_checks_page_is_the_generated_one() -> None:
    page = checks_doc.PAGE.read_text(encoding="utf-8")
    assert page == checks_doc.render_page(), (
        f"docs/knowledge-checks.md is not what the loaders check (a model, a check or its "
        f"message changed). Run: {checks_doc.WRITE_COMMAND}")


def test_the_page_lists_every_check_and_key() -> None:
    page = checks_doc.render_page()
    for check in checks_doc.KNOWLEDGE_CHECKS + checks_doc.CARD_CHECKS:
        assert checks_doc.message_text(check) in page
    for key in ("`procedures[].order_codes[].system`", "`valuesets.<id>.needs_companion`",
                "`questions[].enable_when.answer`", "`override_reasons[].display`"):
        assert key in page
    assert re.search(r"\| `phrases` \| `care-under-way` \| `\{weeks\}`, `\{needed\}` \|", page)


def test_the_editing_page_links_the_checks_page() -> None:
    text = (ROOT / "docs" / "editing-knowledge.md").read_text(encoding="utf-8")
    assert "(knowledge-checks.md)" in text
