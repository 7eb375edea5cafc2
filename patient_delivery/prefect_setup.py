"""Defaults for running Prefect locally, applied before Prefect is imported.

With no Prefect server configured, Prefect starts a temporary one for each process, which on a
small, busy machine can take longer than Prefect's default start-up timeout, and it tries to
send analytics (there may be no network). These defaults keep the embedded setup working; any
value already set in the environment, or a Prefect profile of the user's, wins. Without a
Prefect of the user's, Prefect's home is an owner-only folder in ours and the temporary server
requires a password only this process knows.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from patient_delivery import private


def apply_local_defaults(home: Path) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    user_has_prefect = (
        "PREFECT_API_URL" in os.environ
        or "PREFECT_HOME" in os.environ
        or (Path.home() / ".prefect" / "profiles.toml").exists()
    )
    if not user_has_prefect:
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
