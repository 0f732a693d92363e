"""All configuration in one object. Every field is an environment variable prefixed ``CDS_``."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent


def _default_cards_dir() -> Path:
    """The ``cards/`` folder beside the package (a source checkout or the container image)."""
    return PROJECT_DIR / "cards"


DEV_BASE_URL = "http://127.0.0.1:8080"  # where `make run` serves


class Settings(BaseSettings):
    """Service configuration; docs/configuration.md (generated) says what each variable does."""

    model_config = SettingsConfigDict(env_prefix="CDS_", extra="ignore")

    env: Literal["development", "test", "production"] = "production"

    # HTTP
    public_base_url: str | None = None
    # Base of the canonical URLs of the service's code systems ({base}/fhir/CodeSystem/{id});
    # default: public_base_url. EHRs store these URLs: never change it once live (README).
    canonical_base: str | None = None
    # Former canonical bases whose override-reason codes feedback may still carry (comma-separated)
    canonical_base_previous: str = ""
    max_body_bytes: int = 5 * 1024 * 1024
    # What one hook call may cost (over a limit: 413 with an OperationOutcome)
    max_draft_orders: int = 200
    max_json_depth: int = 64
    max_codings_per_concept: int = 64
    max_code_length: int = 512
    # Hook calls with a body at least this large are evaluated off the event loop (a thread)
    offload_body_bytes: int = 256 * 1024
    # ... and so are calls whose estimated cost, orders x (record resources + 100), is this large
    offload_cost: int = 20_000
    body_read_timeout_seconds: float = 10.0  # a body not received in this time: 408
    # Connections and requests one worker holds at once (uvicorn's limit_concurrency): past it
    # a request gets 503 at once. Headers never finished are the proxy's to cut (deploying.md)
    limit_concurrency: int = Field(default=256, ge=1)
    # /metrics: a bearer token that scrapes must send; without one, /metrics is served only
    # outside production. /openapi.json: public outside production, or when this is true.
    metrics_token: str | None = None
    openapi_public: bool = False
    cors_origins: str = "*"

    # Trust of the calling EHR (JWT)
    trusted_issuers_file: Path | None = None
    jwt_algorithms: str = "ES256,ES384,ES512,RS256,RS384,RS512,PS256,PS384,PS512"
    jwt_leeway_seconds: int = 60
    jwt_max_lifetime_seconds: int = 3600
    # the shared replay check's own deadline; past it this process decides (cds_service.replay)
    jwt_replay_timeout_seconds: float = Field(default=0.5, gt=0)
    jwks_cache_seconds: int = 600
    jwks_timeout_seconds: float = 2.0
    # after a failed JWKS fetch: no new fetch for this long, doubling per failure up to the max
    jwks_retry_min_seconds: float = Field(default=1.0, gt=0)
    jwks_retry_max_seconds: float = Field(default=60.0, gt=0)

    # FHIR fetch of what the prefetch lacks (SSRF guard: only these servers, comma-separated)
    fhir_allowed_servers: str = ""
    fhir_timeout_seconds: float = Field(default=1.0, gt=0)
    fhir_budget_seconds: float = Field(default=2.0, gt=0)  # why 2 s: settings_doc.py
    fhir_max_pages: int = Field(default=10, ge=1)
    fhir_page_size: int = Field(default=200, ge=0)  # _count of each search; 0: not sent
    # Fetch without a token from an allow-listed server when the request sends fhirServer but no
    # fhirAuthorization (an open server, like the sandbox's). Default: on in development only.
    fhir_fetch_without_token: bool | None = None
    fhir_max_response_bytes: int = Field(default=8 * 1024 * 1024, gt=0)  # one answer, decoded

    # Clinical knowledge and card wording
    knowledge_dir: Path | None = None
    cards_dir: Path = Field(default_factory=_default_cards_dir)
    qcdsm_id: str = "cds-lbp-imaging"
    auc_applied: str = "https://acsearch.acr.org/docs/69483/Narrative/"
    assume_candidate_after_failed_care: bool = True
    conservative_care_weeks: int = 6
    elderly_over_age: int = 70  # the fracture red flag: older than this many years
    adult_age: int = Field(default=18, ge=0)  # younger: outside the adult criteria, no card
    recent_red_flag_days: int = 90  # red-flag symptoms this recent count (as do this episode's)
    # A clinician's answer (QuestionnaireResponse of lbp-imaging-auc) counts this long
    answer_valid_days: int = 30

    # The SMART app that asks the questions the record leaves open (/app/); off: no card link
    smart_app_enabled: bool = True
    smart_client_id: str = "cds-lbp-imaging"
    smart_scopes: str = ("launch openid fhirUser patient/Patient.rs patient/Condition.rs "
                         "patient/Procedure.rs patient/ServiceRequest.rs "
                         "patient/MedicationRequest.rs patient/QuestionnaireResponse.crs "
                         "patient/AllergyIntolerance.rs")
    smart_session_seconds: int = 900  # the app's server-side session (holds the access token)
    smart_config_cache_seconds: float = Field(default=300.0, ge=0)  # an EHR's SMART configuration
    smart_launches_per_minute: int = Field(default=120, ge=1)  # per client address, per worker
    smart_launches_per_minute_total: int = Field(default=600, ge=1)  # per worker
    smart_page_bytes: int = Field(default=16 * 1024 * 1024, gt=0)  # read from the EHR per page
    # web origins of EHR pages that may show the app in a frame (a side panel), comma-separated,
    # besides the origins of CDS_FHIR_ALLOWED_SERVERS (Content-Security-Policy frame-ancestors)
    smart_frame_ancestors: str = ""
    # secret that signs the app's session cookie and encrypts its stored tokens (32+ characters);
    # unset: derived from the audit hash key
    smart_session_secret: str | None = None
    episode_grace_days: int = 14
    # with no dated episode: care and candidacy count from this many days back, not all history
    care_window_days: int = 180
    recent_mri_months: int = 12
    recent_trauma_days: int = 90

    # Data and logs
    data_dir: Path = Path("var")
    database_url: str | None = None
    migrate_on_start: bool = True
    audit_hash_key: str | None = None
    audit_flush_seconds: float = 0.5  # longest a queued audit row waits while a batch fills
    audit_batch_rows: int = Field(default=1000, ge=1)  # hook calls per audit write
    audit_queue_rows: int = Field(default=50_000, ge=1)  # calls held in memory (~1-3 KB each)
    audit_retry_max_seconds: float = Field(default=30.0, gt=0)  # back-off cap, database down
    feedback_max_items: int = Field(default=1000, ge=1)  # per feedback post (413 above)
    admin_token: str | None = None
    log_level: str = "INFO"
    log_json: bool = True

    @property
    def database(self) -> str:
        """The database URL: CDS_DATABASE_URL, else a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'cds.db').resolve()}"

    @property
    def is_development(self) -> bool:
        return self.env == "development"

    @property
    def canonical_root(self) -> str:
        """The base of the code systems' canonical URLs (``make run``'s address by default;
        production requires public_base_url, so it never falls back there)."""
        return (self.canonical_base or self.public_base_url or DEV_BASE_URL).rstrip("/")

    @property
    def app_base_url(self) -> str:
        """Where the EHR reaches the service (and its SMART app)."""
        return (self.public_base_url or DEV_BASE_URL).rstrip("/")

    @property
    def previous_canonical_roots(self) -> list[str]:
        return [b.strip().rstrip("/") for b in self.canonical_base_previous.split(",")
                if b.strip()]

    @cached_property
    def jwt_algorithm_list(self) -> list[str]:
        return [a.strip() for a in self.jwt_algorithms.split(",") if a.strip()]

    @cached_property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def get_settings() -> Settings:
    """Read the settings from the environment (a fresh object each call)."""
    return Settings()
