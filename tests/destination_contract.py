"""One contract, every destination: the same cases run against the local folder, S3 and SFTP.

A test module subclasses `DestinationContract` and provides three fixtures:
`destination` (a ready block), `remote` (a `Remote` that reads what arrived and plants files,
independently of the block) and `secrets` (strings that must never show in `str()`/`repr()`).
A subclass whose destination never writes a temporary file (S3: objects appear whole) sets
`writes_temporary_files = False`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Protocol

import pytest
from pydantic import SecretStr

from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import DeliveryError, Receipt, TerminalDeliveryError, Upload
from patient_delivery.blocks.naming import temporary_name
from patient_delivery.store import Store
from tests.gnupg import PASSPHRASE, Keys

BODY = b"<ClinicalDocument xmlns='urn:hl7-org:v3'>" + b"x" * 200_000 + b"</ClinicalDocument>"


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def connect(destination: Destination) -> None:
    """Open a session and close it: connect, authenticate, and whatever else opening involves."""
    with destination.open_session():
        pass


class Remote(Protocol):
    def read(self, path: str) -> bytes | None: ...

    def names(self) -> list[str]: ...

    def plant(self, path: str, content: bytes) -> None:
        """Put a file at `path` the way someone else would, not through the block."""


ESCAPING_PATHS = [
    "../outside.xml",
    "a/../../outside.xml",
    "/outside.xml",
    "a//outside.xml",
    "./outside.xml",
    "a\\..\\..\\outside.xml",
    "a/outside\x00.xml",
    "a/\x1b[31moutside.xml",  # ASCII control characters: ESC, DEL
    "a/outside\x7f.xml",
    "a/outside\x85.xml",  # beyond ASCII: NEL (a control), RLO (a format character)
    "a/\u202eoutside.xml",
    "",
]


def _subscribed(destination: Destination, store: Store) -> tuple[str, str, list[bytes]]:
    """A new organization and project subscribed to `destination` (saved under a new name),
    with three patients of one C-CDA document each: (org ID, project ID, the documents)."""
    from patient_delivery import ingest

    tag = f"m{uuid.uuid4().hex[:8]}"
    destination.save(tag)
    ingest.add_organization(store, tag, tag)
    project = ingest.add_project(store, tag, "Study", f"{tag}-study")
    ingest.subscribe(store, project, f"{destination.get_block_type_slug()}/{tag}")
    documents = []
    for number in range(3):
        patient = ingest.add_patient(store, project, f"MRN-{number}")
        document = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>%d</title></ClinicalDocument>'
        documents.append(document % number)
        ingest.put_document(store, patient, "ccda", documents[-1])
    return tag, project, documents


class DestinationContract:
    writes_temporary_files = True

    @pytest.mark.usefixtures("prefect_api")
    def test_a_run_writes_one_manifest_last_listing_every_file_it_sent_with_its_hash(
        self, destination: Destination, remote: Remote, store: Store
    ) -> None:
        from patient_delivery.flows.deliver import deliver

        tag, project, _ = _subscribed(destination, store)
        summary = deliver()

        [manifest] = [n for n in remote.names() if n.startswith(f"{tag}/{project}/_manifests/")]
        assert manifest.endswith(f"-{summary.flow_run_id}.json")
        listed = json.loads(remote.read(manifest) or b"")
        assert (listed["runId"], listed["organization"], listed["project"]) == (
            summary.flow_run_id, tag, project
        )  # fmt: skip
        assert listed["failed"] == 0 and len(listed["output"]) == summary.delivered == 3
        for entry in listed["output"]:
            content = remote.read(entry["url"])
            assert content is not None and sha(content) == entry["sha256"]
            assert len(content) == entry["size"] and entry["type"] == "ccda"
            assert entry["externalId"].startswith("MRN-") and entry["version"] == 1
            assert "plaintextSha256" not in entry  # sent as stored
        assert deliver().delivered == 0  # a run that sends nothing writes no manifest
        assert len([n for n in remote.names() if "/_manifests/" in n and tag in n]) == 1

    @pytest.mark.usefixtures("prefect_api")
    def test_an_encrypted_run_sends_files_that_gpg_decrypts_to_the_stored_documents(
        self, destination: Destination, remote: Remote, store: Store, pgp_keys: Keys
    ) -> None:
        """Encrypted to the receiver's key and signed with ours: what arrived is what `gpg`
        decrypts, as the organization would, to the stored documents byte for byte; the
        manifest (itself encrypted) lists the hashes of what was sent and of the documents,
        and so does the ledger."""
        from patient_delivery.flows.deliver import deliver
        from patient_delivery.reports import LedgerQuery, deliveries_frame

        encrypted = destination.model_copy(
            update={
                "encryption_key": pgp_keys.receiver_public,
                "signing_key": SecretStr(pgp_keys.ours_secret),
                "signing_key_passphrase": SecretStr(PASSPHRASE),
            }
        )
        tag, project, documents = _subscribed(encrypted, store)
        summary = deliver()
        assert summary.delivered == 3 and summary.failed == 0

        arrived = {n: remote.read(n) or b"" for n in remote.names() if n.startswith(f"{tag}/")}
        [manifest] = [n for n in arrived if "/_manifests/" in n]
        assert manifest.endswith(f"-{summary.flow_run_id}.json.pgp")
        files = {n: c for n, c in arrived.items() if n != manifest}
        assert len(files) == 3 and all(n.endswith(".xml.pgp") for n in files)
        plaintexts = {}
        for name, content in files.items():
            assert b"ClinicalDocument" not in content
            opened = pgp_keys.receiver.decrypt(content)
            assert opened.signed_by == pgp_keys.ours_fingerprint
            plaintexts[name] = opened.plaintext
        assert sorted(plaintexts.values()) == sorted(documents)

        opened = pgp_keys.receiver.decrypt(arrived[manifest])
        assert opened.signed_by == pgp_keys.ours_fingerprint
        listed = json.loads(opened.plaintext)
        assert {entry["url"] for entry in listed["output"]} == set(files)
        for entry in listed["output"]:
            assert entry["sha256"] == sha(files[entry["url"]])
            assert entry["size"] == len(files[entry["url"]])
            assert entry["plaintextSha256"] == sha(plaintexts[entry["url"]])

        ledger = deliveries_frame(store, LedgerQuery(project_id=project))
        assert len(ledger) == 3
        for row in ledger.itertuples():
            assert row.sha256 == sha(files[row.path]) and row.size == len(files[row.path])
            assert row.document_sha256 == sha(plaintexts[row.path])

    @pytest.mark.bad_input
    @pytest.mark.parametrize("path", ESCAPING_PATHS)
    def test_a_path_escaping_the_root_is_refused_before_anything_is_sent(
        self, destination: Destination, remote: Remote, path: str
    ) -> None:
        with destination.open_session() as session, pytest.raises(TerminalDeliveryError) as error:
            session.upload(path, BODY, sha(BODY))
        assert "outside" not in str(error.value)  # the message names no path (paths carry IDs)
        assert remote.names() == []

    def test_leftovers_of_a_cut_write_are_removed_and_nothing_else(
        self, destination: Destination, remote: Remote
    ) -> None:
        leftover = "cut/" + temporary_name("doc.xml")
        others = [
            "cut/doc.xml.partial",
            "cut/.doc.xml.notes",
            "cut/" + temporary_name("doc.xml.v2"),
        ]
        for name in [leftover, *others]:
            remote.plant(name, b"half a document")
        with destination.open_session() as session:
            session.discard_leftovers("cut/doc.xml")
            session.upload("cut/doc.xml", BODY, sha(BODY))
        # A destination that never writes temporary files leaves a look-alike alone: it is not ours.
        kept = [] if self.writes_temporary_files else [leftover]
        assert remote.names() == sorted(["cut/doc.xml", *others, *kept])
        assert remote.read("cut/doc.xml") == BODY

    def test_round_trip_is_byte_identical(self, destination: Destination, remote: Remote) -> None:
        with destination.open_session() as session:
            receipt = session.upload("a/b/doc.xml", BODY, sha(BODY))
        assert (receipt.path, receipt.size, receipt.sha256) == ("a/b/doc.xml", len(BODY), sha(BODY))
        assert remote.read("a/b/doc.xml") == BODY

    def test_missing_nested_folders_are_created(
        self, destination: Destination, remote: Remote
    ) -> None:
        with destination.open_session() as session:
            for depth in range(1, 5):
                path = "/".join(f"level{i}" for i in range(depth)) + "/file.json"
                session.upload(path, b"{}", sha(b"{}"))
        assert remote.read("level0/level1/level2/level3/file.json") == b"{}"

    def test_one_session_serves_many_uploads(
        self, destination: Destination, remote: Remote
    ) -> None:
        with destination.open_session() as session:
            for i in range(25):
                body = f"document {i}".encode()
                session.upload(f"many/{i}.xml", body, sha(body))
        assert all(remote.read(f"many/{i}.xml") == f"document {i}".encode() for i in range(25))

    def test_upload_many_reports_each_by_its_key_and_a_bad_one_fails_alone(
        self, destination: Destination, remote: Remote
    ) -> None:
        bodies = {i: f"document {i}".encode() * 1000 for i in range(12)}
        uploads = [
            (i, Upload(f"batch/{i}.xml", body, sha(b"corrupt" if i == 5 else body)))
            for i, body in bodies.items()
        ]
        with destination.open_session() as session:
            results = dict(session.upload_many(uploads))
        assert sorted(results) == sorted(bodies)  # each upload reported once, by its key
        bad = results.pop(5)
        assert isinstance(bad, DeliveryError) and not bad.retryable
        assert remote.read("batch/5.xml") is None
        for i, receipt in results.items():
            assert isinstance(receipt, Receipt), receipt
            assert (receipt.path, receipt.size) == (f"batch/{i}.xml", len(bodies[i]))
            assert remote.read(f"batch/{i}.xml") == bodies[i]
        assert len(remote.names()) == 11  # nothing temporary left

    def test_upload_to_same_path_replaces_whole_file(
        self, destination: Destination, remote: Remote
    ) -> None:
        with destination.open_session() as session:
            session.upload("same/doc.xml", BODY, sha(BODY))
            session.upload("same/doc.xml", b"short", sha(b"short"))
        assert remote.read("same/doc.xml") == b"short"
        assert [n for n in remote.names() if n.startswith("same/")] == ["same/doc.xml"]

    def test_no_temporary_or_partial_files_remain(
        self, destination: Destination, remote: Remote
    ) -> None:
        with destination.open_session() as session:
            for i in range(5):
                session.upload(f"clean/{i}.xml", BODY, sha(BODY))
        assert sorted(remote.names()) == sorted(f"clean/{i}.xml" for i in range(5))

    def test_content_not_matching_its_checksum_is_refused(
        self, destination: Destination, remote: Remote
    ) -> None:
        with destination.open_session() as session, pytest.raises(DeliveryError) as error:
            session.upload("bad/doc.xml", BODY, sha(b"something else"))
        assert not error.value.retryable
        assert remote.read("bad/doc.xml") is None

    def test_connection_test_writes_and_removes_a_probe(
        self, destination: Destination, remote: Remote
    ) -> None:
        report = destination.test_connection()
        assert report.ok, report.checks
        steps = [c.step for c in report.checks]  # between: what the session learned, if anything
        assert steps[0] == "connect" and steps[-2:] == ["write probe file", "remove probe file"]
        assert remote.names() == []

    def test_no_secret_in_str_or_repr(self, destination: Destination, secrets: list[str]) -> None:
        shown = str(destination) + repr(destination) + destination.describe()
        for secret in secrets:
            assert secret not in shown
