"""The HTTP answers guardd gives itself (a denial's 403, a proxy's 400, 407, 431, 502, 504, and
the 100 Continue a client waiting with a body hears), and a TLS client's alert, sans-I/O.

Each says in its headers and in a one-line body which rule decided and why, and names the
decision by its record's number in the audit trail (`X-Guardd-Decision`), so an agent that
reads the error can stop retrying instead of looking for a way around, and an operator can
find the record. Header values are plain ASCII on one line (anything else becomes "?"), so
what a rule's reason says can never split a header or start another.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING

from guardd.policy.model import Effect

if TYPE_CHECKING:
    from guardd.guard import Verdict

#: What guardd says to a client that waits with a body for `100 Continue` (RFC 9110 10.1.1),
#: once the request is allowed: the expectation goes no further (`follow`), so no server says it.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: What a TLS client refused on its hello hears: a fatal access_denied alert (RFC 8446 6.2), in
#: the clear as any alert before the handshake's keys, so that its error names a refusal, not
#: an EOF (re-attack, 2026-12-06: Python said UNEXPECTED_EOF, Node "socket disconnected").
TLS_ACCESS_DENIED = b"\x15\x03\x03\x00\x02\x02\x31"
#: What a 407 asks for: `Proxy-Authorization: Basic` (the proxy users, `httpUsers`).
PROXY_CHALLENGE = (("Proxy-Authenticate", 'Basic realm="guardd"'),)
#: Longest reason put in a header, and in the body (the record keeps `MAX_FIELD_CHARS`).
_HEADER_TEXT = 300
_BODY_TEXT = 1024


def answer(status: int, why: str, rule: str | None = None, decision: int | None = None,
           extra: tuple[tuple[str, str], ...] = (), protection: str | None = None) -> bytes:
    """A complete `Connection: close` response: status line, X-Guardd headers, text body.
    `protection`: the built-in protection that denied over `rule`'s allow (`X-Guardd-Check`)."""
    phrase = HTTPStatus(status).phrase
    told = why if len(why) <= _BODY_TEXT else why[:_BODY_TEXT - 1] + "\u2026"
    decided = f"built-in protection ({protection}), over " if protection else ""
    body = f"guardd: {status} {phrase}: {decided}" + (f"rule {rule}: " if rule else "") + \
        told + "\n"
    data = body.encode("utf-8", "replace")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close"),
               ("Content-Length", str(len(data)))]
    if decision is not None:
        headers.append(("X-Guardd-Decision", str(decision)))
    if rule:
        headers.append(("X-Guardd-Rule", rule))
    if protection:
        headers.append(("X-Guardd-Check", protection))
    headers.append(("X-Guardd-Reason", why))
    headers.extend(extra)
    head = f"HTTP/1.1 {status} {phrase}\r\n" + "".join(
        f"{name}: {_header_text(value)}\r\n" for name, value in headers) + "\r\n"
    return head.encode("ascii") + data


def for_verdict(status: int, verdict: Verdict, decision: int | None) -> bytes:
    """`answer` for what `verdict` says happened (its outcome, else its reason), with its
    rule, the built-in protection that overrode the rule's allow (session 60's read-through:
    `rule all` alone read as if the allow had denied), and its record's number."""
    judged = verdict.decision
    builtin = judged.builtin if not judged.allowed and judged.rule is not None and \
        judged.rule.effect is Effect.ALLOW else None
    return answer(status, verdict.record.outcome or judged.reason, judged.matched_rule,
                  decision, protection=builtin.value if builtin is not None else None)


def _header_text(value: str) -> str:
    text = "".join(c if " " <= c <= "~" else "?" for c in value)
    return text if len(text) <= _HEADER_TEXT else text[:_HEADER_TEXT - 3] + "..."
