"""Every use of botocore's internals, in one place.

Two things the S3 destination needs have no public botocore API:

- a boto3 session on credentials we hold (the role's *refreshable* credentials, renewed before
  they expire) that also shares the process's parsed service models: botocore's session keeps
  its credentials in `_credentials`, and its loader is a registered component;
- S3's error responses to puts the CRT client sent, parsed into the `ClientError` botocore
  would have raised, so they are explained the same way: botocore's `rest-xml` parser.

`missing()` names whatever of these an upgraded botocore no longer has; a test calls it, so an
upgrade that removes one fails by this module's name rather than somewhere in a run.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import boto3
import botocore.session
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.loaders import Loader, create_loader
from botocore.parsers import create_parser

REQUIRED = ("Session._credentials", "Session.register_component", "parsers.create_parser")
"""botocore's internals this module relies on, as `missing()` reports them."""


@functools.cache
def _service_models() -> Loader:
    """The process's one botocore loader: service models parsed once, shared by every session
    (botocore's own cache only adds to a loader, so sharing one is safe)."""
    return create_loader()


def session_on(credentials: Credentials | None, region: str) -> boto3.Session:
    """A boto3 session on `credentials` (None: the default chain) that shares this process's
    loaded service models: each new session otherwise parses the same JSON again."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _service_models())
    if credentials is not None:
        core._credentials = credentials
    core.set_config_variable("region", region)
    return boto3.Session(botocore_session=core)


class ErrorParser:
    """S3's error answers to PutObject, as botocore's `ClientError`; thread-safe."""

    def __init__(self, client: Any) -> None:
        self.output_shape = client.meta.service_model.operation_model("PutObject").output_shape
        self.parser = create_parser("rest-xml")
        self.lock = threading.Lock()  # parsers keep state between calls

    def client_error(self, status: int, headers: dict[str, str], body: bytes) -> ClientError:
        response = {"status_code": status, "headers": headers, "body": body}
        with self.lock:
            parsed = self.parser.parse(response, self.output_shape)
        parsed.setdefault("ResponseMetadata", {})["HTTPStatusCode"] = status
        error_info = parsed.setdefault("Error", {})
        if not error_info.get("Code"):  # no body (a HEAD-like answer): botocore uses the status
            error_info["Code"] = str(status)
        return ClientError(parsed, "PutObject")  # type: ignore[arg-type]


def missing() -> list[str]:
    """The internals of `REQUIRED` this botocore no longer has (empty when all are there)."""
    gone = []
    core = botocore.session.get_session()
    if not hasattr(core, "_credentials"):
        gone.append("Session._credentials")
    if not callable(getattr(core, "register_component", None)):
        gone.append("Session.register_component")
    try:
        create_parser("rest-xml")
    except Exception:
        gone.append("parsers.create_parser")
    return gone
