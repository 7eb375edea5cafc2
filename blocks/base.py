"""The destination contract: what every place we deliver to promises, written once.

A destination is a Prefect block: configuration plus the behaviour that uses it. Flows only
ever call the methods below; they never know whether the bytes go to a folder, S3 or SFTP.

Rules every destination keeps:

- **Paths** are relative, rendered by `render_path` from the block's `path_template`; the
  template is checked when the block is built, so a bad one never reaches a run.
- **A session** (`open_session`) holds whatever connection the destination needs and is reused
  for many uploads; it is used by one thread at a time and closed by its context manager.
- **Missing folders are created.**
- **A file appears at its final path whole or not at all**: written under a temporary name (or
  sent as one request) and only then put in place, replacing what was there. Re-sending to the
  same path is therefore safe, which is what makes retries free of duplicates.
- **Writes are verified** (size, and SHA-256 where the remote can check it) before the upload
  returns its `Receipt`.
- **Errors** are `TransientDeliveryError` (worth retrying: timeouts, resets, throttling) or
  `TerminalDeliveryError` (retrying cannot help: denied, misconfigured, invalid). Their
  messages say what to fix and never contain document content, secrets or path values.
- **`str(destination)`** describes where it writes without any secret.
- **Encryption** is the base's, not each destination's: with the receiver's OpenPGP key set,
  `delivery_session()` wraps the session so every file is encrypted before it is sent, and the paths
  end in `.pgp` (`blocks.openpgp`).

The vocabulary (errors, `Receipt`, `Upload`, `DestinationSession`) is in `blocks.contract`,
which `naming`, `openpgp`, `probe` and the backends' sessions build on; this module builds the
block on all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator, model_validator

from patient_delivery.blocks import openpgp, probe
from patient_delivery.blocks.contract import (
    ENCRYPTED_SUFFIX,
    DestinationSession,
    TerminalDeliveryError,
)
from patient_delivery.blocks.probe import ConnectionReport
from patient_delivery.paths import (
    DEFAULT_MANIFEST_TEMPLATE,
    DEFAULT_TEMPLATE,
    DOCUMENTS,
    MANIFESTS,
    PathTemplate,
    PathTemplateError,
    PathValueError,
    format_timestamp,
)


class Destination(Block, ABC):
    """Base of every destination block: the path template and the bounds shared by all."""

    sends_over_network: ClassVar[bool] = True
    """Whether a send waits on a peer (a server, a bucket), so that many at once pay off, or
    on this machine's own disk and CPU, where a few at once are as fast as many."""

    path_template: str = Field(
        default=DEFAULT_TEMPLATE,
        title="Path template",
        description=(
            "Where each document lands, relative to the destination's root. Variables: "
            "{orgId}, {projectId}, {healthexPatientId}, {externalId}, {dataType}, {timestamp}. "
            "The file name gets .xml (ccda) or .json (fhir) when it does not end with it."
        ),
        json_schema_extra={"pattern": DOCUMENTS.schema_pattern},
    )
    max_connections: int = Field(
        default=4,
        ge=1,
        le=64,
        title="Max connections",
        description="Most uploads to run at once to this destination (one connection each).",
    )
    lag_objective_minutes: int = Field(
        default=15,
        ge=1,
        le=7 * 24 * 60,
        title="Lag objective (minutes)",
        description=(
            "How long an update may wait to land here: when the oldest delivery owed to this "
            'destination is older, the "destination behind" alert fires (at most once an hour).'
        ),
    )

    manifest_template: str = Field(
        default=DEFAULT_MANIFEST_TEMPLATE,
        title="Manifest path template",
        description=(
            "Where each run writes its manifest for a project (a JSON list of the files it "
            "delivered, with their SHA-256), after every file it lists has landed. Variables: "
            "{orgId}, {projectId}, {timestamp}, {runId}; {projectId} and {runId} are required. "
            "The default goes under the path template's fixed folders (where a role scoped to "
            "them may write). Empty: no manifests."
        ),
        json_schema_extra={"pattern": f"^$|{MANIFESTS.schema_pattern}"},
    )

    encryption_key: str | None = Field(
        default=None,
        title="Receiver's OpenPGP public key",
        description=(
            "The organization's OpenPGP public key, ASCII-armored (-----BEGIN PGP PUBLIC KEY "
            "BLOCK-----). When set, every file (manifests too) is encrypted to it before it "
            "is sent and its name gets .pgp at the end. Refused if revoked, expired or unable "
            "to encrypt."
        ),
    )
    signing_key: SecretStr | None = Field(
        default=None,
        title="Our OpenPGP signing key",
        description=(
            "Optional, with a receiver's key: our OpenPGP secret key, ASCII-armored, to sign "
            "every encrypted file with, so the organization can check it came from us."
        ),
    )
    signing_key_passphrase: SecretStr | None = Field(
        default=None,
        title="Signing key passphrase",
        description="The passphrase of our signing key, if it has one.",
    )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The schema Prefect's UI builds its form from, which shows fields by `position`:
        the destination's required fields first, then its other own fields, then the ones every
        destination shares (which Prefect, following the declaration order, would put first)."""
        schema = super().model_json_schema(*args, **kwargs)
        shared = Destination.model_fields
        own = [name for name in cls.model_fields if name not in shared]
        own.sort(key=lambda name: not cls.model_fields[name].is_required())  # stable
        for position, name in enumerate([*own, *shared]):
            field = schema["properties"].get(cls.model_fields[name].alias or name)
            if field is not None:
                field["position"] = position
        return schema

    @field_validator("encryption_key")
    @classmethod
    def _check_encryption_key(cls, value: str | None) -> str | None:
        if value:
            openpgp.recipient(value)
        return value or None

    @model_validator(mode="after")
    def _check_signing_key(self) -> Destination:
        if self.signing_key is None:
            return self
        if not self.encryption_key:
            raise ValueError("signing_key: needs encryption_key (we sign what we encrypt)")
        passphrase = self.signing_key_passphrase
        try:
            openpgp.signing_key(
                self.signing_key.get_secret_value(),
                passphrase.get_secret_value() if passphrase else None,
            )
        except openpgp.KeyProblem as exc:
            raise ValueError(f"signing_key: {exc}") from None
        return self

    @property
    def encrypts(self) -> bool:
        """Whether files are encrypted to the receiver's key before they are sent."""
        return bool(self.encryption_key)

    def delivery_session(self) -> AbstractContextManager[DestinationSession]:
        """`open_session()`, encrypting every file sent over it when the block holds the
        receiver's key. How the flows connect."""
        if not self.encrypts:
            return self.open_session()
        return openpgp.sealed(self)

    @field_validator("manifest_template")
    @classmethod
    def _check_manifest_template(cls, value: str) -> str:
        if value:
            try:
                PathTemplate.parse_manifest(value)
            except PathTemplateError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def manifest_location(self) -> str:
        """The manifest template in effect: the default is placed under the path template's
        fixed folders (`incoming/` for `incoming/{orgId}/...`), so that a destination that may
        write only there (an S3 role scoped to the prefix) receives its manifests too."""
        if self.manifest_template != DEFAULT_MANIFEST_TEMPLATE:
            return self.manifest_template
        return PathTemplate.parse_cached(self.path_template).fixed_prefix + self.manifest_template

    def render_manifest_path(
        self, org_id: str, project_id: str, moment: datetime, run_id: str
    ) -> str:
        """Where a run's manifest for a project goes ('' when manifests are off)."""
        if not self.manifest_template:
            return ""
        values = {"orgId": org_id, "projectId": project_id, "runId": run_id,
                  "timestamp": format_timestamp(moment)}  # fmt: skip
        try:
            path = PathTemplate.parse_manifest(self.manifest_location).fill(values)
        except PathValueError as exc:
            raise TerminalDeliveryError(f"manifest path: {exc}") from None
        return self._sent_name(path)

    @field_validator("path_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            PathTemplate.parse(value)
        except PathTemplateError as exc:
            raise ValueError(str(exc)) from None
        return value

    def render_path(self, values: Mapping[str, str], data_type: str) -> str:
        """The relative path for one document; raises `PathValueError` for an unsafe value."""
        path = PathTemplate.parse_cached(self.path_template).render(values, data_type)
        return self._sent_name(path)

    def _sent_name(self, path: str) -> str:
        return f"{path}{ENCRYPTED_SUFFIX}" if self.encrypts else path

    @abstractmethod
    def open_session(self) -> AbstractContextManager[DestinationSession]:
        """Connect (authenticate, assume a role, ...) and return a reusable session."""

    @abstractmethod
    def describe(self) -> str:
        """Where this destination writes, as a URL without secrets (e.g. sftp://user@host:22/in)."""

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def __repr__(self) -> str:
        return self.__str__()

    def test_connection(self) -> ConnectionReport:
        """Connect, write a small probe file and remove it, reporting each step (a test write)."""
        return probe.check_connection(self)
