"""Exception hierarchy: one base, one type per kind of failure, messages a user can act on."""

from __future__ import annotations

import errno


class GuarddError(Exception):
    """Base of every error guardd raises on purpose."""


class InvalidHostError(GuarddError, ValueError):
    """A host given by a client or a policy is neither a valid IP literal nor a valid domain name."""


class PolicyError(GuarddError):
    """A policy file is invalid; the message starts with ``file:line:column`` (``file`` alone
    when it is the file as a whole: one that cannot be read)."""

    def __init__(self, message: str, *, file: str = "<policy>", line: int = 0, column: int = 0,
                 hint: str = "") -> None:
        self.file, self.line, self.column, self.hint = file, line, column, hint
        self.bare_message = message
        #: The files the refused policy was read from, or was to be (a domain list not there
        #: yet among them): what `--watch` follows until one changes.
        self.files: tuple[str, ...] = (file,)
        text = f"{file}:{line}:{column}: {message}" if line else f"{file}: {message}"  # (0: the
        #                                                  file as a whole, no place in it)
        if hint:
            text += f" (hint: {hint})"
        super().__init__(text)


class PolicyTestsFailed(GuarddError):
    """A policy's own `tests:` fail: it is not loaded. Each failure starts with file:line."""

    def __init__(self, failures: list[str], files: tuple[str, ...] = ()) -> None:
        self.failures = failures
        #: The files the refused policy was read from (`PolicyError.files`).
        self.files = files
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(f"the policy's tests fail: {failures[0]}{more}")


class ConfigError(GuarddError):
    """The daemon configuration (file or flags) is invalid."""


class DNSWireError(GuarddError):
    """A DNS message cannot be parsed; ``rcode_hint`` is the answer it implies (FORMERR, …)."""

    def __init__(self, message: str, rcode_hint: int = 1) -> None:
        super().__init__(message)
        self.rcode_hint = rcode_hint


class SocksProtocolError(GuarddError):
    """A SOCKS5 client broke the protocol; ``reply_hint`` is the reply code it implies, and
    ``target`` what its request asked for, once read (its record names it)."""

    def __init__(self, message: str, reply_hint: int = 1, target: str | None = None) -> None:
        super().__init__(message)
        self.reply_hint = reply_hint
        self.target = target


class SocksAuthError(SocksProtocolError):
    """An RFC 1929 login failed: unknown user or wrong password, or (``checked`` False) refused
    without looking at the password while the client's failed logins lock it out."""

    def __init__(self, message: str, reply_hint: int = 1, *, checked: bool = True) -> None:
        super().__init__(message, reply_hint)
        self.checked = checked


class AuditError(GuarddError):
    """The audit trail cannot be opened, read or queried as asked."""



class AuditUnavailableError(AuditError):
    """A record could not be written (the trail is down): its answer must not leave."""


class BindError(GuarddError):
    """A listener cannot bind its address: which one, why, and what usually causes it."""

    HINTS = {errno.EADDRINUSE: "address already in use — {busy}",
             errno.EADDRNOTAVAIL: "no interface of this host has that address — is the "
                                  "sandbox up (guardd sandbox up), or the address mistyped?",
             errno.EACCES: "permission denied — ports below 1024 need root or "
                           "CAP_NET_BIND_SERVICE (AmbientCapabilities= in the systemd unit)"}

    def __init__(self, listener: str, address: str, port: int, error: OSError) -> None:
        busy = "is systemd-resolved's stub listening? (ss -lnp 'sport = :53' says who is)" \
            if port == 53 else f"another process serves it (ss -lnp 'sport = :{port}' says who)"
        hint = self.HINTS[error.errno].format(busy=busy) if error.errno in self.HINTS \
            else error.strerror or str(error)
        super().__init__(f"{listener} {address}: {hint}")
