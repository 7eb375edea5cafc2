"""The README is a test: every shell block a user copies (README.md, then the pages of docs/)
runs, in order, as written, in a clean environment (no `PREFECT_API_URL`, no `PREFECT_HOME`, an
empty `HOME`, a fresh `PATIENT_DELIVERY_HOME`), and each command exits 0.

The blocks are read with markdown-it (the parser rich already brings). What the README leaves
for the reader to fill in is filled from what earlier commands printed (the `hx_...` that
`patient add` printed, the host-key line that `destination host-key` printed) or from the
suite's own servers (`sftp.acme.example:2222` is the suite's OpenSSH); `[optional parts]` are
left out, and `uv run X` runs X from this environment (what `uv run` does in a synced
checkout). A block under a heading not in `NOT_RUN` runs: a new command in the README is
covered without editing this test.

The S3 block runs against the suite's moto (IAM enforced) with the README's own permission
policy on the role: our AWS identity and AWS's endpoints come from the environment, as boto3's
default chain finds them on an operator's machine. "Run it as a service" starts its own
`prefect server start`, deploys `prefect.yaml` and starts a worker, on a free port.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from loopback.servers import SFTP_PASSWORD, SFTP_USER, apt_install

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
"""What a user copies commands from: the README, then the pages of docs/."""
RECEIVER_TOOLS = ("jq ",)
"""Commands a receiving organization runs in the folder it received (the walk's local one)."""
BIN = Path(sys.executable).parent

NOT_RUN = {
    "Development": "the suite's own commands: .ci/run runs them",
    "The machine and the method": "docs/performance.md's benchmarks, minutes each: run by hand, "
    "their numbers go in that page",
}
"""Headings whose blocks are not run here, and why (another test covers what they set up)."""

SHELL = ("bash", "sh", "shell")

SERVING = re.compile(r"^(patient-delivery (serve|listen)|prefect (server|worker) start)\b")
"""Commands that run until stopped: started, and passed once they say they are ready (or ended
with 0); stopped when the walk ends."""
READY = {
    "patient-delivery serve": "FHIR at ",
    "patient-delivery listen": "listening for patient.data.updated",
    "prefect worker start": "started!",
}
"""What each command prints once it serves, as a reader waits for it."""
SERVING_SECONDS = 60.0
PREFECT_SERVER_SECONDS = 120.0
"""How long the walk waits for `prefect server start` to answer, as a reader waits for it to
print its dashboard's address."""


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
    logs: Path
    fill: list[tuple[str, str]] = field(default_factory=list)
    """Literal text of the README and what stands in for it, in order."""
    background: list[subprocess.Popen[str]] = field(default_factory=list)
    printed: dict[str, str] = field(default_factory=dict)
    last: str = ""
    """The README line run last."""

    def command(self, line: str) -> str:
        if self.fill:  # one pass: a value put in is not filled again
            values = dict(reversed(self.fill))  # the first of a placeholder's fills wins
            pattern = "|".join(re.escape(placeholder) for placeholder, _ in self.fill)
            line = re.sub(pattern, lambda found: values[found.group(0)], line)
        line = re.sub(r"\s\[[^\]']*\]", "", line)  # [--option VALUE], [ORG]: left out
        return re.sub(r"^uv run (?!--group)", "", line)

    def run(self, line: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str] | None:
        self.last = line
        command = self.command(line)
        exported = re.fullmatch(r"export (\w+)=(.*)", command)
        if exported:
            self.env[exported.group(1)] = _shell_value(exported.group(2), self.env)
            return None
        if command.endswith("&") or SERVING.match(command):
            return self._serve(command.removesuffix("&").strip())
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=self.env, text=True,
                              capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                              check=False)  # fmt: skip
        self.printed[line] = done.stdout
        return done

    def _serve(self, command: str) -> subprocess.CompletedProcess[str]:
        """Start a command that runs until stopped (its output to a file: a pipe nobody reads
        would stall it); it passes once it prints that it is ready (`READY`), or for the
        Prefect server, once its API answers."""
        log = self.logs / f"serving-{len(self.background)}.log"
        with log.open("w") as out:
            server = subprocess.Popen(
                ["bash", "-c", command], cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )  # fmt: skip
        self.background.append(server)
        markers = [said for start, said in READY.items() if command.startswith(start)]
        api = self.env.get("PREFECT_API_URL", "")
        if command.startswith("prefect server start"):
            ready, seconds = (lambda: _api_answers(api)), PREFECT_SERVER_SECONDS
        else:
            assert markers, f"what does {command!r} print once it is ready? (READY)"
            ready, seconds = (lambda: markers[0] in log.read_text()), SERVING_SECONDS
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and server.poll() is None:
            if ready():
                break
            time.sleep(0.2)
        else:
            if server.poll() is None:  # up, yet it never said it was ready
                return subprocess.CompletedProcess(command, 1, "", log.read_text()[-2000:])
        code = server.returncode if server.poll() is not None else 0
        return subprocess.CompletedProcess(command, code, "", log.read_text()[-2000:])

    def stop(self) -> None:
        for process in self.background:  # all at once: each takes seconds to end
            with contextlib.suppress(ProcessLookupError):  # its children, also if it ended
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # a process worker may ignore SIGTERM
        for process in self.background:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _api_answers(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=1):  # noqa: S310 - loopback
            return True
    except OSError:
        return False


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
    walking = Walk(env, tmp_path)
    yield walking
    walking.stop()


def after(walk: Walk, line_start: str, then: Callable[[str], None]) -> Callable[[str], None]:
    """A hook: once the README line starting with `line_start` has run, `then(its output)`."""

    def hook(line: str) -> None:
        if line.startswith(line_start):
            then(walk.printed[line])

    return hook


def before(line_start: str, then: Callable[[], None]) -> Callable[[str], None]:
    """A hook: before the README line starting with `line_start` runs, `then()`."""

    def hook(line: str) -> None:
        if line.startswith(line_start):
            then()

    return hook


def test_the_readme_blocks_are_all_run_or_said_why_not() -> None:
    headings = {block.heading for page in PAGES for block in blocks(page)}
    assert set(NOT_RUN) <= headings, "a heading in NOT_RUN is no longer in the README"
    assert {"Command line", "SFTP: the organization's server, with its host key pinned",
            "S3: the organization's bucket, through its IAM role",
            "Run it as a service"} <= headings  # fmt: skip


def test_a_new_user_walks_the_readme(walk: Walk, tmp_path: Path, sshd, pgp_keys, moto) -> None:  # type: ignore[no-untyped-def]
    from loopback.servers import free_port
    from tests.gnupg import PASSPHRASE
    from tests.test_manifests_owed import scoped_role
    from tests.test_s3_destination import EXTERNAL_ID

    (tmp_path / "acme-public.asc").write_text(pgp_keys.receiver_public)
    (tmp_path / "our-signing-secret.asc").write_text(pgp_keys.ours_secret)
    ccda = sorted((REPO / "tests" / "fixtures" / "ccda").glob("*.xml"))[0]
    incoming = sshd.make_folder("incoming")
    jwks = tmp_path / "acme-etl.jwks.json"
    jwks.write_text(_public_jwks())
    key_file = tmp_path / "acme.key"
    bucket = f"org-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=bucket)
    role = scoped_role(moto, bucket)  # the README's permission policy, on the prefix only
    access, secret = moto.deliverer_keys  # our identity; AWS's endpoints are moto's
    walk.env.update({"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret})
    walk.env.update({"AWS_ENDPOINT_URL_S3": moto.url, "AWS_ENDPOINT_URL_STS": moto.url})
    prefect_port = str(free_port())
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
        ("ORG_EXTERNAL_ID=...", f"ORG_EXTERNAL_ID={EXTERNAL_ID}"),
        ("ORG-BUCKET", bucket),
        ("arn:aws:iam::222222222222:role/healthex-writer", role),
        ("127.0.0.1:4200", f"127.0.0.1:{prefect_port}"),
        ("--port 4200", f"--port {prefect_port}"),
        ("our-signing-secret.asc", str(tmp_path / "our-signing-secret.asc")),
    ]
    hooks = [
        after(walk, "uv run patient-delivery patient add",
              lambda out: walk.fill.insert(0, ("hx_...", out.strip()))),
        after(walk, "uv run patient-delivery destination host-key",
              lambda out: walk.fill.insert(0, (
                  "'[sftp.acme.example]:2222 ssh-ed25519 AAAAC3...'",
                  shlex.quote(out.strip().splitlines()[-1].strip())))),
        after(walk, "uv run patient-delivery destination sftp acme-sftp --",
              lambda out: walk.fill.insert(0, ("patient-delivery destination sftp acme-sftp ...",
                                               walk.command(walk.last)))),
        after(walk, "uv run patient-delivery api-key create",
              lambda out: (key_file.write_text(out.strip().split()[-1]),
                           walk.fill.insert(0, ("pdk_...", out.strip().split()[-1])))),
    ]  # fmt: skip
    first = [before("uv run patient-delivery alerts install --notify slack-webhook/ops",
                    lambda: _slack_block(walk, "ops"))]  # fmt: skip
    if shutil.which("jq") is None:
        apt_install("jq")  # what docs/receivers.md checks a manifest with
    received = tmp_path / "srv" / "acme"  # the local destination the README delivers to
    ran = []
    for block in [block for page in PAGES for block in blocks(page)]:
        if block.heading in NOT_RUN:
            continue
        for line in block.commands:
            if "pytest" in line or line.startswith("apt-get"):
                continue  # the suite itself; root installs
            for hook in first:
                hook(line)
            receiver = line.startswith(RECEIVER_TOOLS)
            if receiver:
                [manifest, *_] = sorted(received.rglob("_manifests/*.json"))
                walk.fill.insert(0, ("MANIFEST.json", str(manifest.relative_to(received))))
            done = walk.run(line, cwd=received if receiver else REPO)
            if done is not None:
                assert done.returncode == 0, (block.heading, line, walk.command(line),
                                              done.stdout[-2000:], done.stderr[-2000:])  # fmt: skip
                assert "Traceback" not in done.stderr, (line, done.stderr[-2000:])
            for hook in hooks:
                hook(line)
            ran.append(line)
    assert any(line.startswith("uv run patient-delivery deliver") for line in ran)
    assert any(line.startswith(RECEIVER_TOOLS) for line in ran)  # checked what it received
    delivered = list(received.rglob("*"))
    assert delivered, "the README's walk delivered nothing into the local destination"


def _slack_block(walk: Walk, name: str) -> None:
    """The notification block the README says to make in the UI, saved on the walk's server."""
    code = ("from prefect.blocks.notifications import SlackWebhook\n"
            f"SlackWebhook(url='http://127.0.0.1:9/hook').save({name!r})")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], env=walk.env, check=True, timeout=120)


def _public_jwks() -> str:
    import json

    from joserfc import jwk

    key = jwk.RSAKey.generate_key(2048, parameters={"kid": "etl-1"})
    return json.dumps({"keys": [key.as_dict(private=False)]})
