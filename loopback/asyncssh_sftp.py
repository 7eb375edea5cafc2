"""AsyncSSH's SFTP server, chrooted to one folder, for one user with a password, on 127.0.0.1:
another implementation of SSH and SFTP than OpenSSH's (it offers `posix-rename@openssh.com` and
OpenSSH's other extensions). In a process of its own, so that a test can SIGKILL it:

    python -m loopback.asyncssh_sftp PORT ROOT HOST_KEY_FILE USER [sha1-only]
    # the password on stdin; `sha1-only` offers only SHA-1 key exchange, as old servers do
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys

import asyncssh


class Login(asyncssh.SSHServer):
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == self.user and hmac.compare_digest(password, self.password)


SHA1_ONLY = {"kex_algs": ["diffie-hellman-group14-sha1", "diffie-hellman-group1-sha1"]}


async def serve(
    port: int, root: str, host_key: str, user: str, password: str, sha1_only: bool
) -> None:
    chroot = os.fsencode(os.path.realpath(root))
    server = await asyncssh.listen(
        "127.0.0.1", port, server_host_keys=[host_key],
        server_factory=lambda: Login(user, password),
        sftp_factory=lambda channel: asyncssh.SFTPServer(channel, chroot=chroot),
        allow_scp=False, **(SHA1_ONLY if sha1_only else {}),
    )  # fmt: skip
    print("listening", flush=True)
    await server.wait_closed()


def main() -> None:
    port, root, host_key, user = sys.argv[1:5]
    password = sys.stdin.readline().rstrip("\n")
    asyncio.run(serve(int(port), root, host_key, user, password, sys.argv[5:] == ["sha1-only"]))


if __name__ == "__main__":
    main()
