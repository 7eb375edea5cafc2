"""Real servers on loopback for the tests: OpenSSH sshd, moto (S3/STS/IAM) and SeaweedFS (S3).

Each is started by the tests on a free 127.0.0.1 port and stopped by its PID. A server that
cannot be started fails the tests that need it, loudly; none is mocked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

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
            pytest.fail(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"server did not listen on 127.0.0.1:{port} within {seconds} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run(*command: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=input, text=True, capture_output=True, check=False)


class SshServer:
    """A private OpenSSH sshd on 127.0.0.1 with one SFTP-only user (password or key login)."""

    def __init__(self) -> None:
        sshd = Path("/usr/sbin/sshd")
        if not sshd.exists():
            pytest.fail("OpenSSH sshd not found: install the Debian package openssh-server")
        if os.geteuid() != 0:
            pytest.fail("the sshd tests run as root (they create a test user)")
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
        shutil.copy(f"{self.client_key}.pub", self.authorized_keys)
        self.authorized_keys.chmod(0o644)
        self._ensure_user()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {self.dir / 'sshd.pid'}\nPasswordAuthentication yes\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"AllowUsers {SFTP_USER}\nAuthorizedKeysFile {self.authorized_keys}\n"
            "MaxStartups 100:30:200\nMaxSessions 50\n"
            "Subsystem sftp internal-sftp\n"
            f"Match User {SFTP_USER}\n    ForceCommand internal-sftp\n"
        )
        self.log = self.dir / "sshd.log"
        self.process = subprocess.Popen(
            [str(sshd), "-D", "-f", str(config), "-E", str(self.log)],
            stdin=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10, self.process, self.log)

    def _ensure_user(self) -> None:
        if _run("id", "-u", SFTP_USER).returncode != 0:
            created = _run("useradd", "--no-create-home", "--home-dir", str(self.home),
                           "--shell", "/usr/sbin/nologin", SFTP_USER)  # fmt: skip
            if created.returncode != 0:
                pytest.fail(f"useradd failed: {created.stderr}")
        else:
            _run("usermod", "--home", str(self.home), SFTP_USER)
        self.home.mkdir()
        shutil.chown(self.home, SFTP_USER, SFTP_USER)
        changed = _run("chpasswd", input=f"{SFTP_USER}:{SFTP_PASSWORD}\n")
        if changed.returncode != 0:
            pytest.fail(f"chpasswd failed: {changed.stderr}")

    def host_key_line(self) -> str:
        kind, blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}"

    def client_private_key(self) -> str:
        return self.client_key.read_text()

    def make_folder(self, name: str) -> Path:
        """A fresh folder in the user's home, owned by the user."""
        folder = self.home / name
        folder.mkdir()
        shutil.chown(folder, SFTP_USER, SFTP_USER)
        return folder

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class CutProxy:
    """A TCP proxy on 127.0.0.1 that resets the connection after `limit` client bytes.

    Stands in for a network that drops mid-upload (no toxiproxy or netem on these machines).
    """

    def __init__(self, target_port: int, limit: int) -> None:
        import threading

        self.target_port = target_port
        self.limit = limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        self.listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if counted and sent + len(data) > self.limit:
                    sink.sendall(data[: self.limit - sent])
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    end.close()
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopped.set()
        self.listener.close()
        self._thread.join(timeout=2)
