"""Settings: where the store and the local Prefect live, from `PATIENT_DELIVERY_*` variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide settings. Every field can be set as `PATIENT_DELIVERY_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="PATIENT_DELIVERY_", extra="ignore")

    home: Path = Field(
        default=Path(".patient-delivery"),
        description="Folder for the embedded store, the local Prefect home and demo deliveries.",
    )
    store_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the store, e.g. postgresql+psycopg://user@host/db. "
            "Default: a SQLite file `store.db` in `home`."
        ),
    )

    lease_seconds: int = Field(
        default=600,
        ge=5,
        description=(
            "How long a delivery run owns what it claimed, renewed as each batch starts; a "
            "run that died loses its claims when this runs out."
        ),
    )
    dask_address: str | None = Field(
        default=None,
        description=(
            "Run upload batches on a Dask cluster: a scheduler address (tcp://host:8786), or "
            "`local` for a cluster of worker processes on this machine. Default: threads in "
            "the flow's own process."
        ),
    )
    max_sessions: int = Field(
        default=32,
        ge=1,
        validation_alias=AliasChoices(
            "PATIENT_DELIVERY_MAX_SESSIONS", "PATIENT_DELIVERY_CONNECTION_BUDGET", "max_sessions"
        ),
        description=(
            "Most destination sessions one process keeps open at once, over every destination "
            "and run (an SFTP session is one SSH connection, an S3 session one upload lane); "
            "as many lanes send at once. Each destination's own `max_connections` bounds its "
            "share. Local folders take no place in it. Also read from the earlier name "
            "PATIENT_DELIVERY_CONNECTION_BUDGET."
        ),
    )
    store_connections: int | None = Field(
        default=None,
        ge=2,
        description=(
            "Most connections to the store one process opens at once (upload lanes each read "
            "documents over one). Default: `max_sessions` + 10. Lower it for a PostgreSQL with "
            "few connections to spare; lanes then wait for one."
        ),
    )
    store_wait_seconds: int = Field(
        default=300,
        ge=1,
        description=(
            "How long work waits for a store connection, when PostgreSQL has none to spare "
            "(its `max_connections`) or this process's pool has lent all it may, before it "
            "fails. What a run has not sent by then is owed to the next run."
        ),
    )
    run_timeout_minutes: int = Field(
        default=120,
        ge=1,
        description=(
            "A delivery, re-delivery or backfill run still going after this long ends TimedOut "
            "(and alerts), so a hung run cannot hold the deployment's one-at-a-time slot "
            "forever; what it had not sent is owed to the next run. Read when the flows are "
            "imported (a worker's run process)."
        ),
    )
    down_after_runs: int = Field(
        default=1,
        ge=1,
        description=(
            "A destination that this many runs in a row failed at and delivered nothing to is "
            "marked down: runs skip it and its deliveries wait until a probe reaches it."
        ),
    )
    probe_first_seconds: int = Field(
        default=60,
        ge=1,
        description=(
            "Seconds from a destination going down to its first probe; each failed probe "
            "waits as long as the destination has been down, at most `probe_most_seconds`."
        ),
    )
    probe_most_seconds: int = Field(
        default=1800,
        ge=1,
        description="Most seconds between two probes of a destination that is down.",
    )
    listener_silent_seconds: int = Field(
        default=90,
        ge=15,
        le=3600,
        description=(
            "While `listen` runs, the deployment's update trigger is paused; if the listener "
            "sends no sign of life for this long (killed, machine gone), Prefect resumes the "
            "trigger. The listener signs every third of it."
        ),
    )
    mcp_sessions_per_organization: int = Field(
        default=50,
        ge=1,
        description=(
            "Most MCP sessions one organization may have open at once on `serve` (the server "
            "holds at most 10,000 for everyone): one organization cannot lock the others out."
        ),
    )
    export_hours: float = Field(
        default=24.0,
        gt=0,
        le=24 * 30,
        description=(
            "Hours a completed FHIR bulk export's files are kept; then they are deleted and "
            "its status URL answers 404."
        ),
    )
    exports_at_once: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Most FHIR bulk exports `serve` writes at once; more wait their turn.",
    )
    exports_per_organization: int = Field(
        default=3,
        ge=1,
        le=100,
        description=(
            "Most FHIR bulk exports one organization may have waiting or being written; a "
            "kick-off beyond it is answered 429 with Retry-After, so one organization cannot "
            "hold up the others' exports."
        ),
    )
    emit_events: bool | None = Field(
        default=None,
        description=(
            "Emit `patient.data.updated` to Prefect on ingest. Default: when PREFECT_API_URL "
            "is set (a running server)."
        ),
    )

    def store_pool(self) -> tuple[int, int]:
        """The store's pool: connections kept open, and how many more it may open."""
        most = self.store_connections or self.max_sessions + 10
        kept = min(5, most)
        return kept, most - kept

    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{(self.home / 'store.db').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
