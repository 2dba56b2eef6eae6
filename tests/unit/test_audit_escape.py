"""`audit export` and `audit verify` output with host strings the agent chose (issue 8, hole 14):
no control character, bidi override or line separator reaches a terminal, no cell starts a
spreadsheet formula, no row is forged. Files only, no sockets."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from guardd.audit import AuditWriter, format_records, iter_records, terminal_safe
from tests.unit.fakes import write_fields

#: What a client can put in a SOCKS domain name or an HTTP Host (the agent controls both).
HOSTILE = [
    ("escape-sequence", "evil\x1b[2J\x1b]0;owned\x07.test"),
    ("formula-equals", "=HYPERLINK(\"http://x.test\",\"click\")"),
    ("formula-plus", "+1+cmd|' /C calc'!A0"),
    ("formula-minus", "-2+3"),
    ("formula-at", "@SUM(1+1)"),
    ("formula-tab", "\t=1+1"),
    ("formula-cr", "\r=1+1"),
    ("formula-after-spaces", "  =1+1"),
    ("formula-fullwidth", "\uff1d1+1"),
    ("forged-row", "a.test\r\n2026-01-01T00:00:00.000Z,network.request,socks,10.0.0.9"),
    ("newline", "a\nb"),
    ("nul", "a\x00b"),
    ("delete", "a\x7fb"),
    ("c1-csi", "a\x9b2Jb"),
    ("nel", "a\x85b"),
    ("bidi-override", "moc.\u202eevil.test"),
    ("bidi-isolate", "a\u2066b\u2069"),
    ("line-separator", "a\u2028b"),
    ("paragraph-separator", "a\u2029b"),
    ("zero-width", "pay\u200bpal.test"),
    ("lone-surrogate", "a\udcffb"),
    ("backslash", "a\\x1bb"),
]
IDS = [name for name, _ in HOSTILE]
TEXTS = [text for _, text in HOSTILE]


def trail_with(directory: Path, host: str) -> list[dict[str, object]]:
    writer = AuditWriter(directory)
    writer.open()
    write_fields(writer, action="network.request", listener="socks", client="10.0.0.2", target=host,
                  domain=host, port=443, effect="deny", matchedRule="catch-all-deny",
                  reason=f"Unauthorized outbound domain {host}")
    writer.close()
    records = list(iter_records(directory))
    assert records[0]["target"] == host  # stored faithfully (escaped by JSON in the file)
    return records


def terminal_clean(text: str) -> bool:
    """Nothing in `text` but printable ASCII and line ends."""
    return all(" " <= ch <= "~" or ch in "\r\n" for ch in text)


@pytest.mark.parametrize("host", TEXTS, ids=IDS)
def test_csv_cells_are_printable_and_never_formulas(tmp_path: Path, host: str) -> None:
    text = "".join(format_records(trail_with(tmp_path, host), "csv"))
    assert all(ch.isprintable() or ch in "\r\n" for ch in text), ascii(text)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == 2, rows  # the header and one record: no forged row
    for cell in rows[1]:
        assert all(ch.isprintable() for ch in cell), cell
        assert cell.lstrip(" ")[:1] not in ("=", "+", "-", "@", "\t", "\r", "\uff1d"), cell
    target = rows[1][rows[0].index("target")]
    assert target == terminal_safe(host) or target == "'" + terminal_safe(host)


@pytest.mark.parametrize("host", TEXTS, ids=IDS)
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_exports_are_ascii_and_round_trip(tmp_path: Path, host: str, fmt: str) -> None:
    records = trail_with(tmp_path, host)
    text = "".join(format_records(records, fmt))
    assert terminal_clean(text), ascii(text)
    parsed = json.loads(text) if fmt == "json" else [json.loads(line) for line in
                                                     text.splitlines()]
    assert parsed[0]["target"] == host


@pytest.mark.parametrize(("text", "shown"), [
    ("plain.example.com", "plain.example.com"),
    ("\x1b[2J", "\\x1b[2J"),
    ("a\tb", "a\\tb"),
    ("a\\b", "a\\\\b"),
    ("\u202e", "\\u202e"),
    ("\U000e0041", "\\U000e0041"),
    ("caf\u00e9", "caf\u00e9"),
], ids=["plain", "escape", "tab", "backslash", "bidi", "tag-character", "printable-non-ascii"])
def test_terminal_safe(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown


def test_csv_keeps_plain_values_as_they_are(tmp_path: Path) -> None:
    text = "".join(format_records(trail_with(tmp_path, "api.example.com"), "csv"))
    row = list(csv.DictReader(io.StringIO(text, newline="")))[0]
    assert (row["target"], row["port"], row["client"]) == ("api.example.com", "443", "10.0.0.2")


def test_verify_prints_paths_and_findings_terminal_safe(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    from guardd.cli import main

    trail = tmp_path / "trail"
    trail_with(trail, "a.test")
    shipped = tmp_path / "anchor\x1b]0;owned\x07\u202e.jsonl"
    shipped.write_bytes((trail / "anchor.jsonl").read_bytes())
    assert main(["audit", "verify", "--audit", str(trail), "--anchor", str(shipped)]) == 0
    out = capsys.readouterr()
    assert "\\x1b]0;owned\\x07\\u202e.jsonl" in out.out
    assert all(ch.isprintable() or ch == "\n" for ch in out.out + out.err), ascii(out)
    (trail / "audit.jsonl").write_bytes(b"")
    assert main(["audit", "verify", "--audit", str(trail), "--anchor", str(shipped)]) == 1
    out = capsys.readouterr()
    assert "broken: " in out.err and "\\x1b]0;owned" in out.err
    assert all(ch.isprintable() or ch == "\n" for ch in out.out + out.err), ascii(out)
