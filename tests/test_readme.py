"""The README is a test: every shell block a user copies runs, in order, as written, in a clean
environment (no `PREFECT_API_URL`, no `PREFECT_HOME`, an empty `HOME`, a fresh
`PATIENT_DELIVERY_HOME`), and each command exits 0.

The blocks are read with markdown-it (the parser rich already brings). What the README leaves
for the reader to fill in is filled from what earlier commands printed (the `hx_...` that
`patient add` printed, the host-key line that `destination host-key` printed) or from the
suite's own servers (`sftp.acme.example:2222` is the suite's OpenSSH); `[optional parts]` are
left out, and `uv run X` runs X from this environment (what `uv run` does in a synced
checkout). A block under a heading not in `NOT_RUN` runs: a new command in the README is
covered without editing this test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from loopback.servers import SFTP_PASSWORD, SFTP_USER

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent

NOT_RUN = {
    "Run it as a service": "a Prefect server, deployments and a worker: tests/test_service.py "
    "runs this setup against a real `prefect server start`",
    "Development": "the suite's own commands: .ci/run runs them",
    "S3: the organization's bucket, through its IAM role": "an AWS account's role: "
    "tests/test_s3_destination.py runs the README's policy against moto with IAM enforced",
}
"""Headings whose blocks are not run here, and why (another test covers what they set up)."""

SHELL = ("bash", "sh", "shell")

SERVING = re.compile(r"^(patient-delivery (serve|listen)|prefect (server|worker) start)\b")
"""Commands that run until stopped: started, and passed once they are still up after
`SERVING_SECONDS` (or ended with 0); stopped when the walk ends."""
SERVING_SECONDS = 8.0


@dataclass
class Block:
    heading: str
    line: int
    commands: list[str]


def blocks(path: Path = README) -> list[Block]:
    """The shell blocks of a Markdown file, each as its logical command lines (continuations
    joined; comments, and lines that are only comments, left out), under its heading."""
    found, heading, tokens = [], "", MarkdownIt().parse(path.read_text())
    for number, token in enumerate(tokens):
        if token.type == "heading_open":
            heading = tokens[number + 1].content
        if token.type == "fence" and token.info.strip() in SHELL:
            found.append(Block(heading, token.map[0] + 1 if token.map else 0,
                               _commands(token.content)))  # fmt: skip
    return found


def _commands(text: str) -> list[str]:
    lines, pending = [], ""
    for raw in text.splitlines():
        line = re.sub(r"\s{2,}#.*$", "", raw).rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        lines.append((pending + line.strip()).strip())
        pending = ""
    return lines


@dataclass
class Walk:
    """One reader going down the README: their environment, and what earlier commands said."""

    env: dict[str, str]
    fill: list[tuple[str, str]] = field(default_factory=list)
    """Literal text of the README and what stands in for it, in order."""
    background: list[subprocess.Popen[str]] = field(default_factory=list)
    printed: dict[str, str] = field(default_factory=dict)

    def command(self, line: str) -> str:
        for placeholder, value in self.fill:
            line = line.replace(placeholder, value)
        line = re.sub(r"\s\[[^\]']*\]", "", line)  # [--option VALUE], [ORG]: left out
        return re.sub(r"^uv run (?!--group)", "", line)

    def run(self, line: str) -> subprocess.CompletedProcess[str] | None:
        command = self.command(line)
        exported = re.fullmatch(r"export (\w+)=(.*)", command)
        if exported:
            self.env[exported.group(1)] = _shell_value(exported.group(2), self.env)
            return None
        if command.endswith("&") or SERVING.match(command):
            server = subprocess.Popen(
                ["bash", "-c", command.removesuffix("&")], cwd=REPO, env=self.env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, start_new_session=True,
            )  # fmt: skip
            self.background.append(server)
            try:
                out, err = server.communicate(timeout=SERVING_SECONDS)
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(command, 0, "", "")  # up and serving
            return subprocess.CompletedProcess(command, server.returncode, out, err)
        done = subprocess.run(["bash", "-c", command], cwd=REPO, env=self.env, text=True,
                              capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                              check=False)  # fmt: skip
        self.printed[line] = done.stdout
        return done

    def stop(self) -> None:
        for process in self.background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            process.communicate(timeout=30)


def _shell_value(text: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", f"printf %s {text}"], cwd=REPO, env=env, text=True,
                          capture_output=True, check=True)  # fmt: skip
    return done.stdout


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walk]:
    home = tmp_path / "empty-home"
    home.mkdir()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PREFECT_", "PATIENT_DELIVERY_", "AWS_"))}  # fmt: skip
    env.update({"HOME": str(home), "PATIENT_DELIVERY_HOME": str(tmp_path / "pd-home"),
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "COLUMNS": "120"})  # fmt: skip
    walking = Walk(env)
    yield walking
    walking.stop()


def after(walk: Walk, line_start: str, then: Callable[[str], None]) -> Callable[[str], None]:
    """A hook: once the README line starting with `line_start` has run, `then(its output)`."""

    def hook(line: str) -> None:
        if line.startswith(line_start):
            then(walk.printed[line])

    return hook


def test_the_readme_blocks_are_all_run_or_said_why_not() -> None:
    headings = {block.heading for block in blocks()}
    assert set(NOT_RUN) <= headings, "a heading in NOT_RUN is no longer in the README"
    assert {"Command line", "SFTP: the organization's server, with its host key pinned"} <= headings


def test_a_new_user_walks_the_readme(walk: Walk, tmp_path: Path, sshd, pgp_keys) -> None:  # type: ignore[no-untyped-def]
    from loopback.servers import free_port
    from tests.gnupg import PASSPHRASE

    (tmp_path / "acme-public.asc").write_text(pgp_keys.receiver_public)
    (tmp_path / "our-signing-secret.asc").write_text(pgp_keys.ours_secret)
    ccda = sorted((REPO / "tests" / "fixtures" / "ccda").glob("*.xml"))[0]
    incoming = sshd.make_folder("incoming")
    jwks = tmp_path / "acme-etl.jwks.json"
    jwks.write_text(_public_jwks())
    key_file = tmp_path / "acme.key"
    walk.fill = [
        ("summary.xml", str(ccda.relative_to(REPO))),
        ("/srv/acme", str(tmp_path / "srv" / "acme")),
        ("--patients 1000", "--patients 20"),
        ("sftp.acme.example:2222", f"127.0.0.1:{sshd.port}"),
        ("--host sftp.acme.example --port 2222", f"--host 127.0.0.1 --port {sshd.port}"),
        ("--username healthex", f"--username {SFTP_USER}"),
        ("ORG_SFTP_PASSWORD=...", f"ORG_SFTP_PASSWORD={shlex.quote(SFTP_PASSWORD)}"),
        ("--root /incoming", f"--root {incoming}"),
        ("acme-etl.jwks.json", str(jwks)),
        ("~/.config/acme.key", str(key_file)),
        ("--port 8080", f"--port {free_port()}"),
        ("OUR_PGP_PASSPHRASE=...", f"OUR_PGP_PASSPHRASE={shlex.quote(PASSPHRASE)}"),
        ("acme-public.asc", str(tmp_path / "acme-public.asc")),
        ("our-signing-secret.asc", str(tmp_path / "our-signing-secret.asc")),
    ]
    hooks = [
        after(walk, "uv run patient-delivery patient add",
              lambda out: walk.fill.insert(0, ("hx_...", out.strip()))),
        after(walk, "uv run patient-delivery destination host-key",
              lambda out: walk.fill.insert(0, (
                  "'[sftp.acme.example]:2222 ssh-ed25519 AAAAC3...'",
                  shlex.quote(out.strip().splitlines()[-1].strip())))),
        after(walk, "uv run patient-delivery api-key create",
              lambda out: (key_file.write_text(out.strip().split()[-1]),
                           walk.fill.insert(0, ("pdk_...", out.strip().split()[-1])))),
    ]  # fmt: skip
    ran = []
    for block in blocks():
        if block.heading in NOT_RUN:
            continue
        for line in block.commands:
            if "pytest" in line or line.startswith(("apt-get", "jq ")):
                continue  # the suite itself; root installs; a receiver's own tools
            done = walk.run(line)
            if done is not None:
                assert done.returncode == 0, (block.heading, line, walk.command(line),
                                              done.stdout[-2000:], done.stderr[-2000:])  # fmt: skip
                assert "Traceback" not in done.stderr, (line, done.stderr[-2000:])
            for hook in hooks:
                hook(line)
            ran.append(line)
    assert any(line.startswith("uv run patient-delivery deliver") for line in ran)
    delivered = list((tmp_path / "srv" / "acme").rglob("*"))
    assert delivered, "the README's walk delivered nothing into the local destination"


def _public_jwks() -> str:
    import json

    from joserfc import jwk

    key = jwk.RSAKey.generate_key(2048, parameters={"kid": "etl-1"})
    return json.dumps({"keys": [key.as_dict(private=False)]})
