"""The SFTP destination: an organization's server, pinned host key, atomic writes.

block.py             settings, validation, connect (pinned host key) and log in
host_keys.py         fingerprints, pinned keys, a server's key for an operator to pin
session.py           one connection's uploads: temporary name, checked writes, rename
pipeline.py          several files' requests on their way over one channel at once
paramiko_adapter.py  every use of paramiko's internals
"""

from patient_delivery.blocks.sftp.block import SftpDestination
from patient_delivery.blocks.sftp.host_keys import (
    HostKeyPin,
    fetch_host_key,
    fingerprint,
    known_hosts_line,
)
from patient_delivery.blocks.sftp.session import SftpSession

__all__ = [
    "HostKeyPin",
    "SftpDestination",
    "SftpSession",
    "fetch_host_key",
    "fingerprint",
    "known_hosts_line",
]
