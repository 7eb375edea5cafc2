"""The local-folder destination against the shared destination contract, and its own failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from patient_delivery.blocks.contract import TransientDeliveryError
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.paths import PathValueError
from tests.destination_contract import BODY, DestinationContract, sha


class FolderRemote:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, path: str) -> bytes | None:
        target = self.root / path
        return target.read_bytes() if target.is_file() else None

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def plant(self, path: str, content: bytes) -> None:
        """Write a file as the owner of the nearest existing folder would (the SFTP user's
        folder belongs to that user)."""
        target = self.root / path
        owner = next(p for p in (target, *target.parents) if p.exists()).stat()
        made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        for created in [target, *made]:
            os.chown(created, owner.st_uid, owner.st_gid)


@pytest.fixture
def destination(tmp_path: Path) -> LocalDestination:
    return LocalDestination(root=tmp_path / "deliveries")


@pytest.fixture
def remote(tmp_path: Path) -> FolderRemote:
    return FolderRemote(tmp_path / "deliveries")


@pytest.fixture
def secrets() -> list[str]:
    return []


class TestLocalDestinationContract(DestinationContract):
    pass


@pytest.mark.bad_input
def test_bad_template_is_refused_when_the_block_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"unknown variable\(s\) \{patient\}"):
        LocalDestination(root=tmp_path, path_template="{patient}/{externalId}")


@pytest.mark.bad_input
def test_render_path_refuses_unsafe_values(tmp_path: Path) -> None:
    block = LocalDestination(root=tmp_path, path_template="{orgId}/{externalId}")
    values = {"orgId": "acme", "externalId": "../../etc", "dataType": "ccda"}
    with pytest.raises(PathValueError, match="externalId"):
        block.render_path(values, "ccda")


def test_a_file_where_a_folder_should_be_fails_cleanly(
    destination: LocalDestination, remote: FolderRemote
) -> None:
    remote.root.mkdir(parents=True)
    (remote.root / "blocked").write_bytes(b"not a folder")
    with destination.open_session() as session, pytest.raises(TransientDeliveryError) as error:
        session.upload("blocked/doc.xml", BODY, sha(BODY))
    assert "blocked" not in str(error.value)  # messages carry no path (paths carry IDs)
    assert remote.names() == ["blocked"]


def test_describe_is_a_file_url(destination: LocalDestination, remote: FolderRemote) -> None:
    assert destination.describe() == remote.root.resolve().as_uri()


def test_a_killed_writes_leftover_is_removed_by_the_next_write_to_that_path(
    destination: LocalDestination, remote: FolderRemote
) -> None:
    leftover = remote.root / "k" / ".doc.xml.0123456789ab.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a document")
    with destination.open_session() as session:
        session.upload("k/doc.xml", BODY, sha(BODY))
    assert remote.names() == ["k/doc.xml"]
