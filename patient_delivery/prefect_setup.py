"""Defaults for running Prefect locally, applied before Prefect is imported.

With no Prefect server configured, Prefect starts a temporary one for each process. On a
2-core machine that took 13-22 s, against a default start-up timeout of 20 s, and it tries to
send analytics (there may be no network). These defaults keep the embedded setup working; any
value already set in the environment, or a Prefect profile of the user's, wins.
"""

from __future__ import annotations

import os
from pathlib import Path


def apply_local_defaults(home: Path) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    user_has_prefect = (
        "PREFECT_API_URL" in os.environ
        or "PREFECT_HOME" in os.environ
        or (Path.home() / ".prefect" / "profiles.toml").exists()
    )
    if not user_has_prefect:
        # Keep Prefect's own database beside the store instead of in ~/.prefect.
        prefect_home = (home / "prefect").resolve()
        prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(prefect_home)
