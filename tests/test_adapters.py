"""The adapters that hold a library's internals: each names what an upgrade took away.

Speed and error handling rest on a few private names of paramiko and botocore (and Prefect's
run-time plumbing on a few of Prefect's). Each adapter lists them and reports the ones the
installed version lacks; these tests fail by the adapter's name when an upgrade removes one,
and show that the check would see it.
"""

from __future__ import annotations

import botocore
import paramiko
import prefect
import pytest
import sqlalchemy

from patient_delivery import local_api_server
from patient_delivery.blocks import openpgp
from patient_delivery.blocks.s3 import botocore_adapter
from patient_delivery.blocks.sftp import paramiko_adapter
from patient_delivery.flows import runtime
from patient_delivery.store import connections


def test_paramiko_still_has_what_the_sftp_pipeline_uses() -> None:
    gone = paramiko_adapter.missing()
    assert gone == [], (
        f"blocks/sftp/paramiko_adapter.py: paramiko {paramiko.__version__} no longer has {gone}"
    )


def test_botocore_still_has_what_the_s3_destination_uses() -> None:
    gone = botocore_adapter.missing()
    assert gone == [], (
        f"blocks/s3/botocore_adapter.py: botocore {botocore.__version__} no longer has {gone}"
    )


def test_pysequoia_still_has_what_openpgp_encryption_uses() -> None:
    gone = openpgp.missing()
    assert gone == [], f"blocks/openpgp.py: this PySequoia no longer has {gone}"


def test_the_pysequoia_check_sees_a_removed_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import pysequoia

    monkeypatch.delattr(pysequoia, "encrypt")
    assert "pysequoia.encrypt" in openpgp.missing()


def test_sqlalchemy_still_has_the_pool_hook_the_store_waits_in() -> None:
    gone = connections.missing()
    assert gone == [], (
        f"patient_delivery/store/connections.py: SQLAlchemy {sqlalchemy.__version__} no longer "
        f"has {gone}"
    )


def test_the_sqlalchemy_check_sees_a_removed_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.pool import QueuePool

    monkeypatch.delattr(QueuePool, "_do_get")
    assert "QueuePool._do_get" in connections.missing()


def test_prefect_still_has_the_api_app_the_temporary_server_serves() -> None:
    gone = local_api_server.missing()
    assert gone == [], (
        f"patient_delivery/local_api_server.py: Prefect {prefect.__version__} no longer has {gone}"
    )


def test_prefect_still_has_what_the_flows_run_time_uses() -> None:
    gone = runtime.missing()
    assert gone == [], f"flows/runtime.py: Prefect {prefect.__version__} no longer has {gone}"


@pytest.mark.parametrize("name", ["_async_request", "_read_response", "_request"])
def test_the_paramiko_check_sees_a_removed_method(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delattr(paramiko.SFTPClient, name)
    assert f"SFTPClient.{name}" in paramiko_adapter.missing()


@pytest.mark.parametrize("name", ["_send_version", "_send_packet", "_read_packet"])
def test_the_paramiko_check_sees_a_removed_packet_method(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from paramiko.sftp import BaseSFTP

    monkeypatch.delattr(BaseSFTP, name)
    assert f"BaseSFTP.{name}" in paramiko_adapter.missing()


def test_the_botocore_check_sees_a_removed_credentials_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = botocore.session.Session.__init__

    def without_slot(self: botocore.session.Session, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        del self._credentials

    monkeypatch.setattr(botocore.session.Session, "__init__", without_slot)
    assert "Session._credentials" in botocore_adapter.missing()
