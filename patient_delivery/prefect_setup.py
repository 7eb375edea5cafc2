"""Defaults for running Prefect locally, applied before Prefect is imported.

Prefect must not try to send analytics (there may be no network). Any value already set in the
environment, or a Prefect profile of the user's, wins. Without a Prefect of the user's (no
`PREFECT_API_URL`, `PREFECT_HOME` or profile), Prefect's home is an owner-only folder in ours
and the command gets a temporary Prefect API of its own (`LocalApi`): started at once, so it
starts while the command imports and reads its store, where Prefect's own temporary server would
only start at the first API call; on a port this process holds from the start, so no other user
can pose as it; answering only to a password this process made; stopped when the command ends.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from patient_delivery import private
from patient_delivery.local_api_server import SOCKET_FD

STARTUP_SECONDS = 120.0
"""How long a temporary API may take to answer: Prefect's first start creates its database,
which on a small, busy machine takes far longer than a later start."""


PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a process gets when the thread that started it ends."""


class PrefectImportedTooEarly(RuntimeError):
    """A command imported Prefect before `apply_local_defaults`: a defect in the command, refused
    rather than run against a server nobody secured."""


class LocalApiError(RuntimeError):
    """The temporary Prefect API did not start; the message says where its log is."""


class LocalApi:
    """Prefect's API (no UI, no background services) on a loopback port, for this process and
    its children, stopped at exit. Its output goes to an owner-only log in Prefect's home.

    This process binds and listens on the port itself and hands the listening socket to the
    server (`patient_delivery.local_api_server`), keeping its own copy until `stop`: from the
    moment the port has a number until the command ends, no other process can bind it, so
    whatever answers there is the server this command started (even after that server died,
    the port stays ours: requests wait and time out rather than reach someone else)."""

    def __init__(self, prefect_home: Path) -> None:
        self.log = prefect_home / "local-api.log"
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        descriptor = self._listener.fileno()
        output = private.open_new(self.log)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "patient_delivery.local_api_server"],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                env={**os.environ, SOCKET_FD: str(descriptor)}, pass_fds=(descriptor,),
                preexec_fn=_end_with_parent(os.getpid()) if sys.platform == "linux" else None,
            )  # fmt: skip
        finally:
            os.close(output)
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout: float = STARTUP_SECONDS) -> None:
        """Return once the API answers; `LocalApiError` if it stopped or did not answer in
        time. (It is not restarted: Prefect, imported meanwhile, has already read its URL.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalApiError(
                    f"Prefect's temporary API stopped while starting "
                    f"(exit {self.process.returncode}); its log: {self.log}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:  # noqa: S310
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise LocalApiError(
            f"Prefect's temporary API did not answer within {timeout:.0f} s; its log: {self.log}"
        )

    def stop(self) -> None:
        """Stop the server (a kill if it has not stopped within 5 s) and give up the port."""
        if self.process.poll() is not None:
            self._listener.close()
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._listener.close()


def _end_with_parent(parent: int) -> Callable[[], None]:
    """For the server's process, before Prefect starts: the kernel stops it when the command
    that started it ends, even killed or terminated (when `stop` never runs). Linux only."""

    def arrange() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the command ended before the kernel could know
            os._exit(0)

    return arrange


def apply_local_defaults(home: Path) -> LocalApi | None:
    """Set Prefect's local defaults; in the embedded setup, start this command's temporary API
    (wait for it with `LocalApi.wait` before the first call to Prefect)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's own temporary server, where a user's profile leaves it to start one:
    os.environ.setdefault(
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", f"{STARTUP_SECONDS:.0f}"
    )
    user_has_prefect = (
        "PREFECT_API_URL" in os.environ
        or "PREFECT_HOME" in os.environ
        or (Path.home() / ".prefect" / "profiles.toml").exists()
    )
    if not user_has_prefect:
        if "prefect" in sys.modules:
            # Prefect read its settings when imported: it would start a temporary server of
            # its own (its port on a command line, no password) and never use ours.
            raise PrefectImportedTooEarly(
                "Prefect was imported before its local defaults were applied"
            )
        # Keep Prefect's own database beside the store instead of in ~/.prefect, owner-only:
        # it holds the block documents and the key that decrypts their secrets.
        prefect_home = (home / "prefect").resolve()
        if not private.warn_if_shared(home.resolve(), "the home folder"):
            private.warn_if_shared(prefect_home, "Prefect's home")
        private.make_folder(prefect_home)
        private.make_file(prefect_home / "prefect.db")
        os.environ["PREFECT_HOME"] = str(prefect_home)
        # The temporary server this process starts answers only to this process (and its
        # children): a password made for this run, passed in the environment, which other
        # users cannot read.
        made = f"patient-delivery:{secrets.token_urlsafe(32)}"
        password = os.environ.setdefault("PREFECT_SERVER_API_AUTH_STRING", made)
        os.environ.setdefault("PREFECT_API_AUTH_STRING", password)
        api = LocalApi(prefect_home)
        os.environ["PREFECT_API_URL"] = api.url
        # The temporary API has no UI and ends with the command: no "View at" address for it.
        os.environ.setdefault("PREFECT_UI_URL", "")
        return api
    return None
