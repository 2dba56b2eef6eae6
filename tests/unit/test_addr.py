"""Tests for guardd.addr: every encoding of the dangerous addresses, names that only look like them,
invalid hosts, the class table row by row, and Hypothesis properties of the parsers."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.addr import (
    translate_through,
    ADDRESS_CLASSES,
    METADATA_ADDRESSES,
    METADATA_NAMES,
    AddrClass,
    Host,
    agent_of,
    classify,
    classify_name,
    count_as_one,
    counted_as,
    embedded_ipv4,
    is_metadata_address,
    normalize_name,
    parse_host,
    parse_ip,
)
from guardd.errors import InvalidHostError

M, LO, UN, LL = AddrClass.METADATA, AddrClass.LOOPBACK, AddrClass.UNSPECIFIED, AddrClass.LINK_LOCAL
MC, BC, PR, PU = AddrClass.MULTICAST, AddrClass.BROADCAST, AddrClass.PRIVATE, AddrClass.PUBLIC

# (host as given, canonical address, class, id)
ENCODINGS = [
    # 169.254.169.254, the metadata address, in every encoding a parser might accept
    ("169.254.169.254", "169.254.169.254", M, "imds-dotted"),
    ("169.254.169.254.", "169.254.169.254", M, "imds-trailing-dot"),
    ("2852039166", "169.254.169.254", M, "imds-decimal"),
    ("0xa9fea9fe", "169.254.169.254", M, "imds-hex"),
    ("0XA9FEA9FE", "169.254.169.254", M, "imds-hex-upper"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254", M, "imds-dotted-hex"),
    ("0251.0376.0251.0376", "169.254.169.254", M, "imds-octal"),
    ("00000251.0376.0251.0376", "169.254.169.254", M, "imds-octal-zero-padded"),
    ("025177524776", "169.254.169.254", M, "imds-octal-whole"),
    ("169.254.43518", "169.254.169.254", M, "imds-short-3"),
    ("169.16689662", "169.254.169.254", M, "imds-short-2"),
    ("0xa9.254.0251.0xfe", "169.254.169.254", M, "imds-mixed"),
    ("0251.0xfe.43518", "169.254.169.254", M, "imds-mixed-short"),
    ("0xa9.0xfea9fe", "169.254.169.254", M, "imds-mixed-short-hex"),
    ("１６９．２５４．１６９．２５４", "169.254.169.254", M, "imds-fullwidth"),
    ("169。254。169。254", "169.254.169.254", M, "imds-ideographic-dots"),
    ("::ffff:169.254.169.254", "::ffff:a9fe:a9fe", M, "imds-mapped-dotted"),
    ("::ffff:a9fe:a9fe", "::ffff:a9fe:a9fe", M, "imds-mapped-hex"),
    ("[::ffff:169.254.169.254]", "::ffff:a9fe:a9fe", M, "imds-mapped-bracketed"),
    ("[::ffff:a9fe:a9fe]", "::ffff:a9fe:a9fe", M, "imds-mapped-hex-bracketed"),
    ("0:0:0:0:0:ffff:a9fe:a9fe", "::ffff:a9fe:a9fe", M, "imds-mapped-long"),
    ("::FFFF:A9FE:A9FE", "::ffff:a9fe:a9fe", M, "imds-mapped-upper"),
    ("::169.254.169.254", "::a9fe:a9fe", M, "imds-compatible"),
    ("[::a9fe:a9fe]", "::a9fe:a9fe", M, "imds-compatible-hex"),
    ("::ffff:0:a9fe:a9fe", "::ffff:0:a9fe:a9fe", M, "imds-siit"),
    ("64:ff9b::169.254.169.254", "64:ff9b::a9fe:a9fe", M, "imds-nat64"),
    ("64:ff9b::a9fe:a9fe", "64:ff9b::a9fe:a9fe", M, "imds-nat64-hex"),
    ("64:ff9b:1::a9fe:a9fe", "64:ff9b:1::a9fe:a9fe", M, "imds-nat64-local-use"),
    # RFC 8215's prefix at /48, /56 and /64 (RFC 6052 2.2: the u octet, bits 64-71, skipped)
    ("64:ff9b:1:a9fe:a9:fe00:808:808", "64:ff9b:1:a9fe:a9:fe00:808:808", M,
     "imds-nat64-local-use-48"),
    ("64:ff9b:1:a9:fe:a9fe:808:808", "64:ff9b:1:a9:fe:a9fe:808:808", M,
     "imds-nat64-local-use-56"),
    ("64:ff9b:1:0:a9:fea9:fe08:808", "64:ff9b:1:0:a9:fea9:fe08:808", M,
     "imds-nat64-local-use-64"),
    # the same with a u octet that is not zero: translators skip it unread
    ("64:ff9b:1:a9fe:1a9:fe00:808:808", "64:ff9b:1:a9fe:1a9:fe00:808:808", M,
     "imds-nat64-local-use-48-u"),
    ("64:ff9b:1:0:1a9:fea9:fe08:808", "64:ff9b:1:0:1a9:fea9:fe08:808", M,
     "imds-nat64-local-use-64-u"),
    ("2002:a9fe:a9fe::", "2002:a9fe:a9fe::", M, "imds-6to4"),
    ("2002:a9fe:a9fe:1234::1", "2002:a9fe:a9fe:1234::1", M, "imds-6to4-host"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "2001:0:4136:e378:8000:63bf:5601:5601", M,
     "imds-teredo"),
    # the other metadata endpoints
    ("169.254.170.2", "169.254.170.2", M, "ecs-dotted"),
    ("0xa9feaa02", "169.254.170.2", M, "ecs-hex"),
    ("::ffff:169.254.170.2", "::ffff:a9fe:aa02", M, "ecs-mapped"),
    ("169.254.170.23", "169.254.170.23", M, "eks-pod-identity"),
    ("fd00:ec2::254", "fd00:ec2::254", M, "aws-v6"),
    ("[FD00:EC2::254]", "fd00:ec2::254", M, "aws-v6-upper-bracketed"),
    ("fd00:0ec2:0000:0000:0000:0000:0000:0254", "fd00:ec2::254", M, "aws-v6-long"),
    ("fd00:ec2::23", "fd00:ec2::23", M, "eks-pod-identity-v6"),
    ("fd20:ce::254", "fd20:ce::254", M, "gcp-v6"),
    ("100.100.100.200", "100.100.100.200", M, "alibaba"),
    ("1684301000", "100.100.100.200", M, "alibaba-decimal"),
    ("0x646464c8", "100.100.100.200", M, "alibaba-hex"),
    ("168.63.129.16", "168.63.129.16", M, "azure-wireserver"),
    ("2822734096", "168.63.129.16", M, "azure-wireserver-decimal"),
    ("192.0.0.192", "192.0.0.192", M, "oracle"),
    ("::ffff:c000:c0", "::ffff:c000:c0", M, "oracle-mapped"),
    # loopback
    ("127.0.0.1", "127.0.0.1", LO, "lo-dotted"),
    ("127.0.0.1.", "127.0.0.1", LO, "lo-trailing-dot"),
    ("127.1", "127.0.0.1", LO, "lo-short-2"),
    ("127.0.1", "127.0.0.1", LO, "lo-short-3"),
    ("2130706433", "127.0.0.1", LO, "lo-decimal"),
    ("0x7f000001", "127.0.0.1", LO, "lo-hex"),
    ("0x7f.1", "127.0.0.1", LO, "lo-hex-short"),
    ("0177.0.0.1", "127.0.0.1", LO, "lo-octal"),
    ("017700000001", "127.0.0.1", LO, "lo-octal-whole"),
    ("127.255.255.254", "127.255.255.254", LO, "lo-top"),
    ("::1", "::1", LO, "lo-v6"),
    ("[::1]", "::1", LO, "lo-v6-bracketed"),
    ("0:0:0:0:0:0:0:1", "::1", LO, "lo-v6-long"),
    ("::ffff:127.0.0.1", "::ffff:7f00:1", LO, "lo-mapped"),
    ("::ffff:7f00:1", "::ffff:7f00:1", LO, "lo-mapped-hex"),
    ("::127.0.0.1", "::7f00:1", LO, "lo-compatible"),
    ("64:ff9b::7f00:1", "64:ff9b::7f00:1", LO, "lo-nat64"),
    ("2002:7f00:1::", "2002:7f00:1::", LO, "lo-6to4"),
    ("2001:0:1:2:3:4:80ff:fffe", "2001:0:1:2:3:4:80ff:fffe", LO, "lo-teredo"),
    ("１２７．０．０．１", "127.0.0.1", LO, "lo-fullwidth"),
    # unspecified
    ("0", "0.0.0.0", UN, "unspec-zero"),
    ("0.0.0.0", "0.0.0.0", UN, "unspec-dotted"),
    ("0x", "0.0.0.0", UN, "unspec-bare-0x"),
    ("0x0", "0.0.0.0", UN, "unspec-hex"),
    ("00", "0.0.0.0", UN, "unspec-octal"),
    ("0.0", "0.0.0.0", UN, "unspec-short"),
    ("0.1.2.3", "0.1.2.3", UN, "unspec-this-network"),
    ("::", "::", UN, "unspec-v6"),
    ("[::]", "::", UN, "unspec-v6-bracketed"),
    ("::ffff:0.0.0.0", "::ffff:0:0", UN, "unspec-mapped"),
    ("::0.0.0.2", "::2", UN, "unspec-compatible"),
    # private
    ("10.0.0.1", "10.0.0.1", PR, "rfc1918-10"),
    ("10.1", "10.0.0.1", PR, "rfc1918-10-short"),
    ("012.0.0.1", "10.0.0.1", PR, "rfc1918-10-octal"),
    ("0xa000001", "10.0.0.1", PR, "rfc1918-10-hex"),
    ("167772161", "10.0.0.1", PR, "rfc1918-10-decimal"),
    ("172.16.0.1", "172.16.0.1", PR, "rfc1918-172"),
    ("0xac.0x10.0.1", "172.16.0.1", PR, "rfc1918-172-hex"),
    ("192.168.1.1", "192.168.1.1", PR, "rfc1918-192"),
    ("3232235777", "192.168.1.1", PR, "rfc1918-192-decimal"),
    ("0xc0a80101", "192.168.1.1", PR, "rfc1918-192-hex"),
    ("100.64.0.1", "100.64.0.1", PR, "cgnat"),
    ("192.0.0.1", "192.0.0.1", PR, "ietf-assignments"),
    ("198.18.0.1", "198.18.0.1", PR, "benchmarking"),
    ("198.19.255.255", "198.19.255.255", PR, "benchmarking-top"),
    ("fc00::1", "fc00::1", PR, "ula-fc"),
    ("fd12:3456::1", "fd12:3456::1", PR, "ula-fd"),
    ("fec0::1", "fec0::1", PR, "site-local"),
    ("::ffff:10.0.0.1", "::ffff:a00:1", PR, "rfc1918-mapped"),
    ("::ffff:c0a8:101", "::ffff:c0a8:101", PR, "rfc1918-mapped-hex"),
    ("64:ff9b::10.0.0.1", "64:ff9b::a00:1", PR, "rfc1918-nat64"),
    ("2002:c0a8:101::1", "2002:c0a8:101::1", PR, "rfc1918-6to4"),
    # link-local, multicast, broadcast and reserved
    ("169.254.0.1", "169.254.0.1", LL, "link-local"),
    ("169.254.169.253", "169.254.169.253", LL, "aws-dns-link-local"),
    ("fe80::1", "fe80::1", LL, "link-local-v6"),
    ("::ffff:169.254.1.1", "::ffff:a9fe:101", LL, "link-local-mapped"),
    ("224.0.0.1", "224.0.0.1", MC, "multicast"),
    ("0xe0000001", "224.0.0.1", MC, "multicast-hex"),
    ("239.255.255.250", "239.255.255.250", MC, "multicast-ssdp"),
    ("ff02::1", "ff02::1", MC, "multicast-v6"),
    ("255.255.255.255", "255.255.255.255", BC, "broadcast"),
    ("4294967295", "255.255.255.255", BC, "broadcast-decimal"),
    ("0xffffffff", "255.255.255.255", BC, "broadcast-hex"),
    ("240.0.0.1", "240.0.0.1", BC, "reserved"),
    ("::ffff:255.255.255.255", "::ffff:ffff:ffff", BC, "broadcast-mapped"),
    ("2001::1", "2001::1", BC, "teredo-client-255.255.255.254"),
    # public, documentation ranges included
    ("8.8.8.8", "8.8.8.8", PU, "public"),
    ("134744072", "8.8.8.8", PU, "public-decimal"),
    ("0x8.0x8.0x8.0x8", "8.8.8.8", PU, "public-dotted-hex"),
    ("192.0.2.1", "192.0.2.1", PU, "doc-192-0-2"),
    ("198.51.100.7", "198.51.100.7", PU, "doc-198-51-100"),
    ("203.0.113.9", "203.0.113.9", PU, "doc-203-0-113"),
    ("2001:db8::1", "2001:db8::1", PU, "doc-v6"),
    ("[2606:4700::1111]", "2606:4700::1111", PU, "public-v6"),
    ("::ffff:8.8.8.8", "::ffff:808:808", PU, "public-mapped"),
    ("64:ff9b::808:808", "64:ff9b::808:808", PU, "public-nat64"),
    ("2002:808:808::1", "2002:808:808::1", PU, "public-6to4"),
]


@pytest.mark.parametrize(("text", "address", "klass"), [row[:3] for row in ENCODINGS],
                         ids=[row[3] for row in ENCODINGS])
def test_address_encodings(text: str, address: str, klass: AddrClass) -> None:
    ip = ipaddress.ip_address(address)
    host = parse_host(text)
    assert host == Host(None, ip)
    assert str(host) == str(ip)  # ipaddress's canonical text (3.13 prints mapped ones dotted)
    assert parse_ip(text) == host.ip
    assert classify(host.ip) is klass
    assert is_metadata_address(host.ip) is (klass is M)


def test_encoding_table_is_large_and_unique() -> None:
    assert len(ENCODINGS) >= 70
    assert len({row[0] for row in ENCODINGS}) == len(ENCODINGS)
    assert len({row[3] for row in ENCODINGS}) == len(ENCODINGS)


# (host as given, normalized name, id): names that look like addresses but are names
NAMES = [
    ("169.254.169.254.nip.io", "169.254.169.254.nip.io", "ip-then-name"),
    ("127.0.0.1.sslip.io", "127.0.0.1.sslip.io", "loopback-then-name"),
    ("0x7f.example.com", "0x7f.example.com", "hex-label-then-name"),
    ("0xa9fea9fe.com", "0xa9fea9fe.com", "hex-then-tld"),
    ("localtest.me", "localtest.me", "localtest"),
    ("1e100.net", "1e100.net", "1e100"),
    ("1.2.3.4a", "1.2.3.4a", "last-label-not-numeric"),
    ("0xg", "0xg", "not-hex"),
    ("123abc", "123abc", "digits-then-letters"),
    ("Example.COM.", "example.com", "case-and-trailing-dot"),
    ("_dmarc.example.com", "_dmarc.example.com", "underscore"),
    ("-leading.example", "-leading.example", "ascii-leading-hyphen"),
    ("trailing-.example", "trailing-.example", "ascii-trailing-hyphen"),
    ("xn--bcher-kva.de", "xn--bcher-kva.de", "a-label"),
    ("XN--BCHER-KVA.DE", "xn--bcher-kva.de", "a-label-upper"),
    ("bücher.de", "xn--bcher-kva.de", "u-label"),
    ("BÜCHER.de", "xn--bcher-kva.de", "u-label-upper"),
    ("faß.de", "xn--fa-hia.de", "nontransitional-sharp-s"),
    ("_dmarc.bücher.de", "_dmarc.xn--bcher-kva.de", "underscore-and-u-label"),
    ("ｅｘａｍｐｌｅ．ｃｏｍ", "example.com", "fullwidth"),
    ("example。com", "example.com", "ideographic-dot"),
    ("localhost", "localhost", "localhost"),
    ("metadata", "metadata", "single-label"),
    ("a" * 63 + ".com", "a" * 63 + ".com", "label-63"),
    (".".join(["a" * 63] * 3 + ["a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 61]), "name-253"),
    (".".join(["a" * 63] * 3 + ["a" * 61]) + ".", ".".join(["a" * 63] * 3 + ["a" * 61]),
     "name-253-trailing-dot"),
]


@pytest.mark.parametrize(("text", "name"), [row[:2] for row in NAMES],
                         ids=[row[2] for row in NAMES])
def test_names_stay_names(text: str, name: str) -> None:
    assert parse_ip(text) is None
    assert parse_host(text) == Host(name, None)
    assert normalize_name(text) == name
    assert normalize_name(name) == name


# (host as given, a phrase the message must hold, id)
INVALID = [
    ("fe80::1%eth0", "zone id", "zone"),
    ("fe80::1%25eth0", "zone id", "zone-url-escaped"),
    ("[fe80::1%25eth0]", "zone id", "zone-bracketed"),
    ("foo.1.2.3.4", "at most 4", "name-then-ip"),
    ("1.2.3.4.5", "at most 4", "five-parts"),
    ("256.1.1.1", "greater than 255", "octet-256"),
    ("1.2.3.256", "greater than 255", "last-octet-256"),
    ("1.2.65536", "greater than 65535", "short-3-overflow"),
    ("1.16777216", "greater than 16777215", "short-2-overflow"),
    ("4294967296", "greater than 4294967295", "decimal-overflow"),
    ("0x100000000", "greater than 4294967295", "hex-overflow"),
    ("9" * 5000, "greater than 4294967295", "huge-decimal"),
    ("foo.0x", "'foo' is not a number", "bare-0x-last"),
    ("foo.0X1F", "'foo' is not a number", "hex-last"),
    ("08.1.1.1", "octal", "bad-octal"),
    ("1.2.3.09", "octal", "bad-octal-last"),
    ("0xg.1.2.3", "hex", "bad-hex"),
    ("1..2.3", "empty part", "empty-part"),
    ("１.2.3.4.5", "at most 4", "fullwidth-five-parts"),
    ("", "empty", "empty"),
    (".", "empty", "root"),
    ("a..b", "empty label", "double-dot"),
    (".a", "empty label", "leading-dot"),
    ("a.b..", "empty label", "two-trailing-dots"),
    ("a\x00b", "'\\x00'", "nul"),
    ("a b", "' '", "space"),
    (" example.com", "' '", "leading-space"),
    ("example.com ", "' '", "trailing-space"),
    ("a\tb", "'\\t'", "tab"),
    ("*.example.com", "'*'", "wildcard"),
    ("a/b", "'/'", "slash"),
    ("user@example.com", "'@'", "at-sign"),
    ("a" * 64 + ".com", "64 characters", "label-64"),
    (".".join(["a" * 63] * 3 + ["a" * 62]), "254 characters", "name-254"),
    ("[::1", "IPv6", "unclosed-bracket"),
    ("::1]", "IPv6", "stray-bracket"),
    ("[1.2.3.4]", "IPv6", "bracketed-ipv4"),
    ("[example.com]", "IPv6", "bracketed-name"),
    ("example.com:443", "IPv6", "host-and-port"),
    ("1:2:3:4:5:6:7:8:9", "IPv6", "nine-groups"),
    ("-bücher.de", "hyphen", "idna-leading-hyphen"),
    ("a_ü.de", "U+005F", "idna-underscore"),
]


@pytest.mark.parametrize(("text", "phrase"), [row[:2] for row in INVALID],
                         ids=[row[2] for row in INVALID])
def test_invalid_hosts(text: str, phrase: str) -> None:
    with pytest.raises(InvalidHostError) as info:
        parse_host(text)
    message = str(info.value)
    assert phrase in message
    assert repr(text)[:60] in message  # the message quotes the offending input
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ["1.2.3.4", "0x7f000001", "localhost.1", "127.0.0.1."])
def test_normalize_name_refuses_what_ends_in_a_number(text: str) -> None:
    with pytest.raises(InvalidHostError, match="is a number"):
        normalize_name(text)


def test_host_holds_exactly_one_of_name_and_ip() -> None:
    with pytest.raises(ValueError):
        Host(None, None)
    with pytest.raises(ValueError):
        Host("example.com", ipaddress.ip_address("192.0.2.1"))
    assert str(Host("example.com", None)) == "example.com"


# --- the class table ---------------------------------------------------------------------------

@pytest.mark.parametrize(("network", "klass"), [row[:2] for row in ADDRESS_CLASSES],
                         ids=[str(row[0]) for row in ADDRESS_CLASSES])
def test_class_table_rows(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
                          klass: AddrClass) -> None:
    first, last = network.network_address, network.broadcast_address
    for ip in (first, last, first + network.num_addresses // 2):
        assert classify(ip) is klass, ip


def test_class_table_rows_nest_only_when_they_agree() -> None:
    for net_a, class_a, _ in ADDRESS_CLASSES:
        for net_b, class_b, _ in ADDRESS_CLASSES:
            if net_a is not net_b and net_a.version == net_b.version and net_a.overlaps(net_b):
                assert class_a is class_b, (net_a, net_b)


@pytest.mark.parametrize(("text", "klass"), [
    ("126.255.255.255", PU), ("128.0.0.0", PU), ("9.255.255.255", PU), ("11.0.0.0", PU),
    ("100.63.255.255", PU), ("100.128.0.0", PU), ("169.253.255.255", PU), ("169.255.0.0", PU),
    ("172.15.255.255", PU), ("172.32.0.0", PU), ("192.0.1.0", PU), ("192.167.255.255", PU),
    ("192.169.0.0", PU), ("198.17.255.255", PU), ("198.20.0.0", PU), ("223.255.255.255", PU),
    ("1.0.0.0", PU), ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", BC), ("fe00::", BC),
    ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", BC), ("ff00::", MC), ("100::", PR),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", PU), ("2001:1::1", PR), ("3fff::1", PU),
    ("ff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", BC), ("0100:0:0:2::", BC), ("2001:3::", PR),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", PR), ("2001:200::", PU),
    ("5eff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", BC), ("5f01::", BC), ("2000::", PU),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", BC),
    ("3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", PU), ("4000::", BC),
])
def test_class_boundaries(text: str, klass: AddrClass) -> None:
    assert classify(ipaddress.ip_address(text)) is klass


@pytest.mark.parametrize(("text", "klass"), [
    ("::2:0:0", BC), ("::1:a9fe:a9fe", BC), ("::ffff:a9fe:a9fe:0", BC), ("::a9fe:a9fe:0:0", BC),
    ("64:ff9b::a9fe:a9fe:0", BC), ("64:ff9b:0:0:a9:fea9:fe00:0", BC),
    ("64:ff9b:2::a9fe:a9fe", BC), ("64:ff9a::1", BC), ("100::1", PR), ("100:0:0:1::1", PR),
    ("2001:2::1", PR), ("5f00::1", PR), ("101::1", BC), ("200::1", BC), ("1000::1", BC),
    # (the last attack of session 54: the rest of IETF protocol assignments, 2001::/23, as
    # IPv4's 192.0.0.0/24; Teredo, 2001::/32, is judged by the address it carries)
    ("2001:1::3", PR), ("2001:5::1", PR), ("2001:10::1", PR), ("2001:4:112::1", PR),
    ("2001:1ff::1", PR), ("2001:200::1", PU),
    ("4000::1", BC), ("8000::a9fe:a9fe", BC), ("e000::1", BC), ("fe00::1", BC)])
def test_ipv6_space_no_one_routes_is_not_public(text: str, klass: AddrClass) -> None:
    """Session 53's attack (Low): the rest of ::/8 beside the IPv4-carrying ranges, NAT64's
    unassigned space in it (169.254.169.254 in an RFC 6052 /64 layout under 64:ff9b::/32),
    discard-only 100::/64 and 100:0:0:1::/64, benchmarking 2001:2::/48 (IPv4's 198.18/15 is
    private) and SRv6 segment identifiers 5f00::/16 were public; its re-attack reached trap
    servers at 4000::1, 101::1, fe00::1 and 8000::a9fe:a9fe. None is globally reachable (only
    2000::/3 is global unicast), and a translator or a segment routing domain may still take
    them somewhere: the reserved space is closed as IPv4's 240/4 is, the special-purpose
    ranges as private (each opened only by a rule naming it)."""
    assert classify(ipaddress.ip_address(text)) is klass


@pytest.mark.parametrize("ip", list(METADATA_ADDRESSES), ids=[str(ip) for ip in METADATA_ADDRESSES])
def test_every_metadata_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert classify(ip) is M
    assert is_metadata_address(ip)
    assert METADATA_ADDRESSES[ip]  # one comment per entry
    assert not is_metadata_address(ip + 1)
    if ip.version == 4:
        for wrapped in (f"::ffff:{ip}", f"64:ff9b::{ip}", f"::{ip}"):
            assert classify(ipaddress.ip_address(wrapped)) is M, wrapped


@pytest.mark.parametrize("name", list(METADATA_NAMES), ids=list(METADATA_NAMES))
def test_every_metadata_name(name: str) -> None:
    assert normalize_name(name) == name
    assert classify_name(name) is M
    assert METADATA_NAMES[name]


@pytest.mark.parametrize("name", ["metadata.platformequinix.com", "metadata.packet.net"])
def test_the_metadata_names_at_public_addresses_are_metadata(name: str) -> None:
    """Session 61's attack (Info): Equinix Metal serves an instance's metadata and userdata
    (SSH keys, custom data) at a public address by these names, to the instance, unasked for
    any credential; a SOCKS connect by name went under an allow of every domain."""
    assert classify_name(name) is M


@pytest.mark.parametrize(("name", "klass"), [
    ("localhost", LO), ("foo.localhost", LO), ("a.b.localhost", LO),
    ("localhost.example.com", None), ("notlocalhost", None), ("example.com", None),
    ("metadata.google.internal.evil.com", None), ("google.internal", None),
], ids=str)
def test_classify_name(name: str, klass: AddrClass | None) -> None:
    assert classify_name(name) is klass


@pytest.mark.parametrize(("text", "embedded"), [
    ("::ffff:1.2.3.4", "1.2.3.4"), ("::1.2.3.4", "1.2.3.4"), ("::ffff:0:1.2.3.4", "1.2.3.4"),
    ("64:ff9b::1.2.3.4", "1.2.3.4"), ("64:ff9b:1::1.2.3.4", "1.2.3.4"),
    ("64:ff9b:1:c000:2:100::", "192.0.2.1"),
    ("2002:102:304::", "1.2.3.4"), ("2001:0:4136:e378:8000:63bf:fefd:fcfb", "1.2.3.4"),
    ("::", None), ("::1", None), ("2001:db8::1.2.3.4", None), ("fe80::1.2.3.4", None),
])
def test_embedded_ipv4(text: str, embedded: str | None) -> None:
    result = embedded_ipv4(ipaddress.IPv6Address(text))
    assert result == (None if embedded is None else ipaddress.IPv4Address(embedded))


@pytest.mark.parametrize(("text", "klass"), [
    ("2001:db8:1:2:0:5efe:a9fe:a9fe", M), ("2001:db8:1:2:200:5efe:a9fe:a9fe", M),
    ("2001:db8:1:2::5efe:7f00:1", LO), ("2001:db8:1:2::5efe:a00:1", PR),
    ("fe80::5efe:c633:6408", LL), ("fd00::5efe:c633:6408", PR),
    ("fd00::5efe:a9fe:a9fe", M), ("2001:db8:1:2::5efe:c633:6408", PU),
    ("2001:db8:1:2:100:5efe:a9fe:a9fe", PU),  # (the g bit: no ISATAP identifier)
    ("2002:c633:6408:1:0:5efe:a9fe:a9fe", M),  # (under a 6to4 prefix, as ISATAP was deployed)
    ("2001:0:c633:6408:0:5efe:a9fe:a9fe", M),  # (under Teredo's: review)
], ids=str)
def test_an_isatap_address_is_judged_by_the_stricter_of_its_two_readings(
        text: str, klass: AddrClass) -> None:
    """ISATAP (RFC 5214) puts an IPv4 address in the interface identifier (`0:5efe` or
    `200:5efe`, under any /64 prefix): a host with an ISATAP tunnel sends the packets there,
    one without to the IPv6 address. guardd cannot know which, so it takes the stricter
    (attack pass: `2001:db8::5efe:a9fe:a9fe` passed as a public address)."""
    assert classify(ipaddress.IPv6Address(text)) is klass
    assert is_metadata_address(ipaddress.IPv6Address(text)) is (klass is M)


def test_tables_are_read_only() -> None:
    with pytest.raises(TypeError):
        METADATA_NAMES["example.com"] = "oops"  # type: ignore[index]
    with pytest.raises(TypeError):
        METADATA_ADDRESSES[ipaddress.ip_address("192.0.2.1")] = "oops"  # type: ignore[index]


# --- properties --------------------------------------------------------------------------------

_LDH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
_labels = st.text(alphabet=_LDH, min_size=1, max_size=63)
_last_labels = _labels.filter(lambda label: not (label.isdigit() or label.lower().startswith("0x")))
valid_names = st.builds(lambda labels, last, dot: ".".join([*labels, last]) + dot,
                        st.lists(_labels, max_size=5), _last_labels, st.sampled_from(["", "."])
                        ).filter(lambda name: len(name.rstrip(".")) <= 253)


@given(valid_names)
def test_normalize_name_on_valid_names(text: str) -> None:
    name = normalize_name(text)
    assert name == text.lower().removesuffix(".")
    assert normalize_name(name) == name
    assert parse_host(text) == Host(name, None)


@given(st.text(max_size=40))
def test_normalize_name_raises_or_returns_a_fixed_point(text: str) -> None:
    try:
        name = normalize_name(text)
    except InvalidHostError:
        return
    assert normalize_name(name) == name
    assert name.isascii() and name == name.lower()


@given(st.text(max_size=40))
def test_parse_host_raises_only_invalid_host_error(text: str) -> None:
    try:
        host = parse_host(text)
    except InvalidHostError:
        return
    assert parse_host(str(host)) == host  # the canonical text parses back to the same host


def _encode(number: int, style: str) -> str:
    return {"dec": str(number), "oct": "0" + format(number, "o"), "hex": hex(number),
            "HEX": "0X" + format(number, "X")}[style]


@st.composite
def ipv4_encodings(draw: st.DrawFn) -> tuple[str, int]:
    """Any inet_aton encoding: 1 to 4 parts, each part decimal, octal or hex."""
    value = draw(st.integers(0, 2**32 - 1))
    count = draw(st.integers(1, 4))
    octets = value.to_bytes(4, "big")
    parts = [*octets[:count - 1], int.from_bytes(octets[count - 1:], "big")]
    styles = draw(st.lists(st.sampled_from(["dec", "oct", "hex", "HEX"]), min_size=count,
                           max_size=count))
    return ".".join(_encode(part, style) for part, style in zip(parts, styles)), value


@given(ipv4_encodings())
def test_parse_ip_agrees_with_inet_aton(encoding: tuple[str, int]) -> None:
    text, value = encoding
    expected = ipaddress.IPv4Address(value)
    assert parse_ip(text) == expected
    assert parse_ip(text + ".") == expected
    assert socket.inet_aton(text) == expected.packed


@given(st.ip_addresses())
def test_parse_ip_agrees_with_ipaddress(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert parse_ip(str(ip)) == ip
    assert parse_host(str(ip)) == Host(None, ip)
    if ip.version == 6:
        assert parse_ip(f"[{ip.exploded}]") == ip


def _naive_classify(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> AddrClass:
    """The obvious reading of the tables: unwrap, metadata first, first containing row."""
    if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)) is not None:
        ip = inner
    if ip in METADATA_ADDRESSES:
        return M
    return next((klass for network, klass, _ in ADDRESS_CLASSES if ip in network), PU)


_interesting = st.one_of(
    st.ip_addresses(),
    st.sampled_from([row[0] for row in ADDRESS_CLASSES]).flatmap(
        lambda network: st.ip_addresses(network=network)),
    st.sampled_from(list(METADATA_ADDRESSES)),
    st.integers(0, 2**32 - 1).map(lambda n: ipaddress.IPv6Address((0xFFFF << 32) | n)),
)


@given(_interesting)
def test_compiled_classify_equals_naive_scan(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
                                             ) -> None:
    assert classify(ip) is _naive_classify(ip)


def test_the_addresses_of_an_agents_network_count_as_one_client() -> None:
    """Left open by session 57's re-attack (Low, availability): an agent sending from 1,000
    addresses of an IPv6 /64 routed to it was 1,000 clients in the fair turns for upstream
    sockets, the caps in flight and the CPU shares. `sameClient` may name networks: every
    address in one counts as its group's first (a network's, its first address)."""
    count_as_one([("10.200.0.2", "fd00:6a72::/64"), ("10.9.0.0/24",)])
    try:
        for address in ("fd00:6a72::1234", "fd00:6a72::ffff:ffff:ffff:ffff", "10.200.0.2"):
            assert counted_as(address) == agent_of(address) == "10.200.0.2", address
        for address in ("10.9.0.77", "::ffff:10.9.0.78", "10.9.0.0"):
            assert counted_as(address) == "10.9.0.0", address
        for address in ("fd00:6a72:0:1::1", "10.9.1.1", "10.200.0.3", "fe80::1%eth0"):
            assert counted_as(address) == address, address
    finally:
        count_as_one([])
    assert counted_as("fd00:6a72::1234") == "fd00:6a72::1234"


@pytest.mark.parametrize(("prefix", "address", "carried"), [
    ("2001:db8:64::/96", "2001:db8:64::a00:5", "10.0.0.5"),
    ("2001:db8:64::/96", "2001:db8:64::a9fe:a9fe", "169.254.169.254"),
    ("2001:db8:64::/96", "2001:db8:64::c633:6408", "198.51.100.8"),
    ("2001:db8::/32", "2001:db8:a00:5::", "10.0.0.5"),
    ("2001:db8:100::/40", "2001:db8:10a:0:5::", "10.0.0.5"),
    ("2001:db8:1::/48", "2001:db8:1:a00:0:500::", "10.0.0.5"),
    ("2001:db8:1:100::/56", "2001:db8:1:10a:0:5::", "10.0.0.5"),
    ("2001:db8:1:2::/64", "2001:db8:1:2:a:0:500:0", "10.0.0.5"),
])
def test_an_address_under_a_configured_nat64_prefix_is_judged_by_what_it_carries(
        prefix: str, address: str, carried: str) -> None:
    """Session 61's attack (Medium; High where such a translator runs): only NAT64's
    well-known and local-use prefixes were read, so under a network-specific prefix (RFC 6052:
    IPv6-only Kubernetes with Jool or tayga, many ISPs), `2001:db8:64::a00:5` was a public
    address: a SOCKS connect reached 10.0.0.5 through tayga, and a DNS64 AAAA for a name whose
    A was filtered as private passed. `nat64Prefixes` names them (RFC 6052 2.2's layouts, the
    u octet skipped)."""
    ip = ipaddress.ip_address(address)
    try:
        translate_through([ipaddress.ip_network(prefix)])
        assert embedded_ipv4(ip) == ipaddress.ip_address(carried)
        assert classify(ip) is classify(ipaddress.ip_address(carried))
    finally:
        translate_through([])
    assert embedded_ipv4(ip) is None and classify(ip) is AddrClass.PUBLIC
