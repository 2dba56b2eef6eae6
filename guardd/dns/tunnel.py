"""DNS tunnel detection inside allowed zones: sans-I/O, bounded in memory whatever the agent sends.

A wildcard allow (`*.amazonaws.com`, `*.githubusercontent.com`) lets an agent encode data in
subdomains that no rule denies: iodine and dnscat2 send hundreds of names a minute, each with
labels of 50 and more base32 or hex characters, many asked as TXT, NULL or CNAME. guardd sends
every allowed name upstream, so it counts, per client and registrable domain (the Public Suffix
List's ICANN section, offline, through `publicsuffixlist`: `x.s3.amazonaws.com` and
`y.githubusercontent.com` count under amazonaws.com and githubusercontent.com, where one
tunnel's names would otherwise spread over many "owners"), what tunnels look like:

* **unique-names**: different names in the window;
* **long-labels**: names with a label over `maxLabelLength` whose characters look encoded
  (Shannon entropy of at least `LONG_LABEL_ENTROPY` bits a character: base32 and hex data do,
  words and CDN hostnames do not);
* **record-types**: different names asked as TXT, NULL, CNAME, MX, SRV or ANY.

Past any budget of the policy's `dnsTunnel` the pair is suspected for a window: every lookup
under that domain from that client is refused (NXDOMAIN, EDE 15 "tunnel suspected", recorded
with the signal), so what leaves is bounded by the budget, not by the agent's patience. Fixed
windows: a counter starts again when its window is over.

Memory: at most `MAX_ZONES` (client, domain) pairs, least recently seen first out, each holding
at most `max_unique_names + 1` name hashes.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from publicsuffixlist import PublicSuffixList

from guardd.policy.model import TunnelBudget

#: (client, registrable domain) pairs followed at once.
MAX_ZONES = 2048
#: Bits a character at least for a long label to look encoded (base32 data: about 4.5 over 52
#: characters; hex about 3.8; English words and hostnames 2.5 to 3.3).
LONG_LABEL_ENTROPY = 3.5
UNUSUAL_TYPES = frozenset({"TXT", "NULL", "CNAME", "MX", "SRV", "ANY"})


def entropy(text: str) -> float:
    """Shannon entropy of `text`'s characters, in bits a character."""
    size = len(text)
    return -sum(count / size * math.log2(count / size) for count in Counter(text).values())


def long_encoded_label(name: str, longest: int) -> bool:
    """Has `name` a label over `longest` characters that looks like encoded data?"""
    return any(len(label) > longest and entropy(label.lower()) >= LONG_LABEL_ENTROPY
               for label in name.split("."))


@dataclass(slots=True)
class _Zone:
    started: float
    names: set[int] = field(default_factory=set)
    long_labels: int = 0
    unusual: int = 0
    #: Suspected until then (0: not), and why.
    until: float = 0.0
    why: str = ""


class TunnelDetector:
    """Counts lookups per (client, registrable domain) against the policy's budget."""

    def __init__(self, budget: TunnelBudget) -> None:
        self.budget = budget
        self._zones: OrderedDict[tuple[str, str], _Zone] = OrderedDict()
        self._suffixes = PublicSuffixList(only_icann=True)

    def domain(self, name: str) -> str:
        """The registrable domain `name` counts under (the name itself above any)."""
        return self._suffixes.privatesuffix(name) or name

    def observe(self, client: str, name: str, qtype: str, now: float) -> str:
        """Count a lookup of `name` by `client` at `now`; why a tunnel is suspected there ("":
        it is not)."""
        budget = self.budget
        if not budget.enabled:
            return ""
        key = (client, self.domain(name))
        zone = self._zones.get(key)
        if zone is None:
            zone = self._zones[key] = _Zone(now)
            if len(self._zones) > MAX_ZONES:
                self._zones.popitem(last=False)
        else:
            self._zones.move_to_end(key)
        if zone.until > now:
            return zone.why
        if now - zone.started >= budget.window:
            zone.started, zone.names, zone.long_labels, zone.unusual = now, set(), 0, 0
        digest = hash(name)
        if digest in zone.names:
            return ""
        zone.names.add(digest)
        domain, window = key[1], budget.window_text
        why = ""
        if len(zone.names) > budget.max_unique_names:
            why = f"unique-names: over {budget.max_unique_names} names under {domain} in {window}"
        elif long_encoded_label(name, budget.max_label_length):
            zone.long_labels += 1
            if zone.long_labels > budget.max_long_labels:
                why = (f"long-labels: over {budget.max_long_labels} names under {domain} with an "
                       f"encoded-looking label over {budget.max_label_length} characters in "
                       f"{window}")
        if not why and qtype in UNUSUAL_TYPES:
            zone.unusual += 1
            if zone.unusual > budget.max_unusual_types:
                why = (f"record-types: over {budget.max_unusual_types} names under {domain} "
                       f"asked as TXT, NULL, CNAME, MX, SRV or ANY in {window}")
        if why:
            zone.until, zone.why = now + budget.window, why
            zone.names = set()  # (suspected: nothing more to count until it is over)
        return why
