"""`destination test`: connect, write a small probe file, remove it, and say how each step
went, in words for people."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from patient_delivery.blocks import openpgp
from patient_delivery.blocks.contract import DeliveryError
from patient_delivery.paths import PathTemplate

if TYPE_CHECKING:
    from patient_delivery.blocks.base import Destination


@dataclass
class ConnectionCheck:
    """One step of `test_connection`, for people: what was tried and how it went."""

    step: str
    ok: bool
    detail: str = ""


@dataclass
class ConnectionReport:
    destination: str
    checks: list[ConnectionCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


def check_connection(destination: Destination) -> ConnectionReport:
    """Connect, write a small probe file and remove it, reporting each step (a test write);
    where manifests go elsewhere, a probe there too."""
    report = ConnectionReport(destination=destination.describe())
    # Under the templates' fixed folders, where a least-privilege policy lets us write.
    name = f".patient-delivery-probe-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.txt"
    probes = [PathTemplate.parse(destination.path_template).fixed_prefix + name]
    if destination.manifest_template:
        manifests = PathTemplate.parse_manifest(destination.manifest_location).fixed_prefix
        if manifests + name not in probes:
            probes.append(manifests + name)
    content = b"patient-delivery connection test; safe to delete\n"
    if destination.encrypts:
        key = openpgp.info(destination.encryption_key or "")
        report.checks.append(ConnectionCheck("encryption key", True, f"encrypts to {key}"))
    for check in _probe_steps(destination, probes, content):
        report.checks.append(check)
        if not check.ok:
            break
    return report


def _probe_steps(
    destination: Destination, probes: list[str], content: bytes
) -> Iterator[ConnectionCheck]:
    try:
        session_context = destination.open_session()
        session = session_context.__enter__()
    except DeliveryError as exc:
        yield ConnectionCheck("connect", False, str(exc))
        return
    try:
        yield ConnectionCheck("connect", True, destination.describe())
        for what, found in session.facts():
            yield ConnectionCheck(what, True, found)
        for number, probe in enumerate(probes):
            where = " (where manifests go)" if number else ""
            try:
                receipt = session.upload(probe, content, hashlib.sha256(content).hexdigest())
            except DeliveryError as exc:
                yield ConnectionCheck(f"write probe file{where}", False, str(exc))
                return
            yield ConnectionCheck(
                f"write probe file{where}", True, f"{receipt.size} bytes at {receipt.path}"
            )
            try:
                session.remove(probe)
            except DeliveryError as exc:
                yield ConnectionCheck(f"remove probe file{where}", False,
                                      f"{exc} (the probe {probe} may be left behind)")  # fmt: skip
                return
            yield ConnectionCheck(f"remove probe file{where}", True)
    finally:
        session_context.__exit__(None, None, None)
