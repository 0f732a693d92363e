"""Clinical knowledge as data: value sets, the procedure catalog, the rating matrix, the questions.

The YAML files beside this module are loaded and checked once at start-up by :func:`load_knowledge`
(``questions.yaml`` by :func:`cds_service.questionnaire.load_questions`). A site can point
``CDS_KNOWLEDGE_DIR`` at its own copy of the four files. The modules, by job:

- :mod:`~cds_service.knowledge.models`: one pydantic model per file (unknown keys refused);
- :mod:`~cds_service.knowledge.checks`: the checks beyond the models, declared with their
  messages, and :class:`KnowledgeError`;
- :mod:`~cds_service.knowledge.loader`: :func:`load_knowledge` and :func:`require_valuesets`;
- :mod:`~cds_service.knowledge.index`: :class:`Knowledge` and its code lookup indexes;
- :mod:`~cds_service.knowledge.yaml`: reading a file into its model, with messages naming the
  file, the entry and the fix;
- :mod:`~cds_service.knowledge.vocabulary`: the fixed vocabularies (variants, categories, ...);
- :mod:`~cds_service.knowledge.doc`: the page ``docs/knowledge-checks.md``, generated.
"""

from __future__ import annotations

from cds_service.knowledge.checks import KnowledgeError
from cds_service.knowledge.index import (
    Combination,
    Knowledge,
    MedicationClass,
    Procedure,
    ValueSetRule,
)
from cds_service.knowledge.loader import KNOWLEDGE_DIR, load_knowledge, require_valuesets
from cds_service.knowledge.vocabulary import (
    CATEGORIES,
    CATEGORY_RANK,
    ICD10CM,
    MODALITIES,
    PAMA_CODE,
    REGIONS,
    VARIANTS,
)
from cds_service.knowledge.yaml import read_yaml_mapping

__all__ = [
    "CATEGORIES",
    "CATEGORY_RANK",
    "ICD10CM",
    "KNOWLEDGE_DIR",
    "MODALITIES",
    "PAMA_CODE",
    "REGIONS",
    "VARIANTS",
    "Combination",
    "Knowledge",
    "KnowledgeError",
    "MedicationClass",
    "Procedure",
    "ValueSetRule",
    "load_knowledge",
    "read_yaml_mapping",
    "require_valuesets",
]
