"""A local IMAP server (Dovecot from the system's packages) for development and tests.

The local stack and the tests run their own Dovecot instance: its configuration, sockets, logs
and mail live under one folder, it listens on 127.0.0.1 only, and it stops with its owner.
Every user name is a mailbox, created on first use, and every mailbox has the same password,
so that any sender address of a campaign has an inbox the engine can poll. This is a
development server: it has no TLS and accepts plain-text logins on loopback.

Mail is put into a mailbox with IMAP APPEND (`append_message`), logged in as its owner. Dovecot
refuses mail access as root, so when it runs as root the mail processes switch to the system's
`mail` user and chroot into the mail folder, and only IMAP (not LMTP) supports that chroot.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from imapclient import IMAPClient

from sequencer.config import SANDBOX_IMAP_PASSWORD

logger = logging.getLogger(__name__)

START_TIMEOUT = 20.0
# Debian's dovecot-core puts the binary in /usr/sbin, which is not on every user's PATH.
_SEARCH_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"))


class ImapServerError(RuntimeError):
    """The local IMAP server could not start."""


def find_dovecot() -> Path | None:
    """Return the path of the `dovecot` binary, or None when it is not installed."""
    found = shutil.which("dovecot", path=_SEARCH_PATH)
    return Path(found) if found else None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _config(root: Path, host: str, port: int, password: str) -> str:
    """Return a Dovecot 2.3 configuration that keeps everything under `root`."""
    mail = root / "mail"
    if os.geteuid() == 0:
        # Debian's package creates the dovecot and dovenull users. The mail processes run as
        # `mail` and chroot into the mail folder, whose parents may be closed to other users.
        internal = "dovecot" if _user_exists("dovecot") else "root"
        login = "dovenull" if _user_exists("dovenull") else internal
        mail_user = pwd.getpwnam("mail")
        mail_group = grp.getgrgid(mail_user.pw_gid)
        identity = f"""default_internal_user = {internal}
default_internal_group = {grp.getgrgid(pwd.getpwnam(internal).pw_gid).gr_name}
default_login_user = {login}
mail_uid = {mail_user.pw_name}
mail_gid = {mail_group.gr_name}
first_valid_uid = {mail_user.pw_uid}
first_valid_gid = {mail_group.gr_gid}
valid_chroot_dirs = {mail}
"""
        home = f"{mail}/./"
    else:
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        identity = f"""default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
mail_uid = {user}
mail_gid = {group}
first_valid_uid = {os.geteuid()}
first_valid_gid = {os.getegid()}
"""
        home = str(mail)
    return f"""# Written by sequencer.imap_server for a local development server; do not edit.
base_dir = {root / "run"}
state_dir = {root / "state"}
instance_name = sequencer-{port}
log_path = {root / "dovecot.log"}
protocols = imap
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
{identity}
mail_location = maildir:~/%Lu
passdb {{
  driver = static
  args = password={password}
}}
userdb {{
  driver = static
  args = home={home} allow_all_users=yes
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


class Dovecot:
    """One Dovecot instance serving IMAP on `host:port`, with its files under `root`.

    Start it with `start()` or use it as a context manager. `password` is the password of
    every mailbox. `preexec_fn` runs in the child before Dovecot starts, as in `subprocess`.
    """

    def __init__(
        self,
        root: Path,
        *,
        port: int,
        host: str = "127.0.0.1",
        password: str = SANDBOX_IMAP_PASSWORD,
        binary: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self._preexec_fn = preexec_fn
        self.host = host
        self.port = port
        self.password = password
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def imap_url(self) -> str:
        return f"imap://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.root / "dovecot.log"

    def start(self) -> None:
        """Write the configuration, start Dovecot in the foreground and wait for its port.

        Raises ImapServerError when Dovecot is not installed, exits, or does not listen within
        START_TIMEOUT seconds.
        """
        binary = self._binary or find_dovecot()
        if binary is None:
            raise ImapServerError(
                "dovecot not found: install Debian's dovecot-imapd package "
                "(apt-get install dovecot-imapd)"
            )
        if _port_open(self.host, self.port):
            raise ImapServerError(f"port {self.port} on {self.host} is already in use")
        for folder in ("run", "state", "mail"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            mail_user = pwd.getpwnam("mail")
            os.chown(self.root / "mail", mail_user.pw_uid, mail_user.pw_gid)
        config = self.root / "dovecot.conf"
        config.write_text(_config(self.root, self.host, self.port, self.password))

        output = (self.root / "dovecot.out").open("ab")
        self._process = subprocess.Popen(
            [str(binary), "-F", "-c", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=self._preexec_fn,
        )
        output.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not _port_open(self.host, self.port):
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise ImapServerError(
                    f"dovecot exited with code {code}; see {self.root / 'dovecot.out'} "
                    f"and {self.log_file}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ImapServerError(
                    f"dovecot did not listen on {self.host}:{self.port} within "
                    f"{START_TIMEOUT:.0f}s; see {self.log_file}"
                )
            time.sleep(0.05)
        logger.info("IMAP server (Dovecot) listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop Dovecot and its child processes. Stopping a stopped server does nothing."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # The master process stops its children when it gets SIGTERM.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        logger.info("IMAP server on %s:%d stopped", self.host, self.port)

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def append_message(
    host: str,
    port: int,
    username: str,
    password: str,
    raw: bytes,
    *,
    folder: str = "INBOX",
    timeout: float = 30.0,
) -> None:
    """Put one message into a mailbox with IMAP APPEND, logged in as the mailbox's owner.

    Blocking: call it from a thread in async code. Raises imapclient's exceptions and OSError.
    """
    client = IMAPClient(host, port=port, ssl=False, timeout=timeout)
    try:
        client.login(username, password)
        client.append(folder, raw)
    finally:
        with contextlib.suppress(Exception):
            client.logout()
