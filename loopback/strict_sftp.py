"""A strict SFTP version 3 server, as many Windows and managed-file-transfer servers behave: no
protocol extension answered (no `posix-rename@openssh.com`, no `limits@openssh.com`), SETSTAT
refused, a rename over an existing file refused (as version 3 says), a `mkdir` of an existing
folder refused, the chroot's root not described by `stat`, and at most `MOST_OPEN` files open
at once per session (a plain failure beyond, as servers with a handle limit answer). One
folder is served as `/` to one user with a password, on 127.0.0.1.

Built on paramiko's server framework (`SFTPServerInterface`, `SFTPHandle`), in a process of its
own so that a test can SIGKILL it:

    python -m loopback.strict_sftp PORT ROOT HOST_KEY_FILE USER [fsize=BYTES]   # password on stdin

`fsize=BYTES` limits the size of any file the server writes (`RLIMIT_FSIZE`), as a quota or a
full disk would: a write past it fails, and the server answers a plain failure.
"""

from __future__ import annotations

import os
import posixpath
import resource
import signal
import socket
import sys
import threading
from pathlib import Path

import paramiko
from paramiko.sftp import (
    SFTP_FAILURE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
)


def _status(error: OSError) -> int:
    if isinstance(error, FileNotFoundError):
        return SFTP_NO_SUCH_FILE
    if isinstance(error, PermissionError):
        return SFTP_PERMISSION_DENIED
    return SFTP_FAILURE


MOST_OPEN = 2


class File(paramiko.SFTPHandle):
    server: StrictV3

    def close(self) -> None:
        super().close()
        self.server.open_files -= 1

    def stat(self) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self.writefile.fileno()))
        except OSError as error:
            return _status(error)

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        return SFTP_OP_UNSUPPORTED


class StrictV3(paramiko.SFTPServerInterface):
    root = Path("/nonexistent")
    open_files = 0

    def _real(self, path: str) -> str:
        return str(self.root) + posixpath.normpath(posixpath.join("/", path))

    def canonicalize(self, path: str) -> str:
        return posixpath.normpath(posixpath.join("/", path))

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes) -> File | int:
        if self.open_files >= MOST_OPEN:
            return SFTP_FAILURE
        try:
            descriptor = os.open(self._real(path), flags, 0o644)
        except OSError as error:
            return _status(error)
        self.open_files += 1
        handle = File(flags)
        handle.server = self
        handle.filename = self._real(path)
        mode = "r+b" if flags & (os.O_WRONLY | os.O_RDWR) else "rb"
        handle.readfile = handle.writefile = os.fdopen(descriptor, mode)
        return handle

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        if self.canonicalize(path) == "/":
            return SFTP_PERMISSION_DENIED  # the chroot's root is not described
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._real(path)))
        except OSError as error:
            return _status(error)

    lstat = stat

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        try:
            folder = self._real(path)
            return [paramiko.SFTPAttributes.from_stat(os.stat(os.path.join(folder, name)), name)
                    for name in os.listdir(folder)]  # fmt: skip
        except OSError as error:
            return _status(error)

    def remove(self, path: str) -> int:
        try:
            os.remove(self._real(path))
        except OSError as error:
            return _status(error)
        return SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        if os.path.lexists(self._real(newpath)):
            return SFTP_FAILURE  # version 3: a rename never replaces
        try:
            os.rename(self._real(oldpath), self._real(newpath))
        except OSError as error:
            return _status(error)
        return SFTP_OK

    def mkdir(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        try:
            os.mkdir(self._real(path))
        except OSError as error:
            return _status(error)
        return SFTP_OK

    def rmdir(self, path: str) -> int:
        try:
            os.rmdir(self._real(path))
        except OSError as error:
            return _status(error)
        return SFTP_OK

    def chattr(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        return SFTP_OP_UNSUPPORTED


class Login(paramiko.ServerInterface):
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def check_auth_password(self, username: str, password: str) -> int:
        if (username, password) == (self.user, self.password):
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def _serve(connection: socket.socket, host_key: paramiko.PKey, login: Login) -> None:
    transport = paramiko.Transport(connection)
    transport.add_server_key(host_key)
    transport.set_subsystem_handler("sftp", paramiko.SFTPServer, StrictV3)
    try:
        transport.start_server(server=login)
    except (paramiko.SSHException, EOFError, OSError):
        transport.close()


def main() -> None:
    port, root, host_key_file, user = sys.argv[1:5]
    for option in sys.argv[5:]:
        if option.startswith("fsize="):
            limit = int(option.removeprefix("fsize="))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    StrictV3.root = Path(root).resolve()
    password = sys.stdin.readline().rstrip("\n")
    host_key = paramiko.Ed25519Key.from_private_key_file(host_key_file)
    login = Login(user, password)
    listener = socket.create_server(("127.0.0.1", int(port)), backlog=128)
    print("listening", flush=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=_serve, args=(connection, host_key, login), daemon=True).start()


if __name__ == "__main__":
    main()
