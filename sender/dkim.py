"""DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463), as RFC 8301 asks.

We sign with ``cryptography`` rather than dkimpy: measured here, dkimpy 1.1.8 takes 9.4 ms per
RSA-2048 signature (its RSA is Python's ``pow``) where OpenSSL takes 0.96 ms. dkimpy stays in
the tests, as the verifier and as the oracle for canonicalization.

What a signature covers:

- the signing domain is that of the address in the message's one From: header (RFC 5322.From;
  the first mailbox if it lists several), IDNA-encoded; the keys of that domain sign, else
  those of the nearest parent that has keys (``d=example.com`` on mail from
  ``news.example.com`` still aligns under relaxed DMARC). No From, two From, or no key: the
  message goes out unsigned;
- every key of that domain signs, in config order: an RSA and an Ed25519 key give two
  signatures, so verifiers that know only RSA still find one (RFC 8463);
- relaxed/relaxed canonicalization, SHA-256, the whole body (no ``l=``), ``t=`` and no ``x=``;
- ``h=`` lists each header of the key's set as often as it occurs, instances taken bottom-up
  (RFC 6376 §5.4.2), and those in ``OVERSIGN`` once more, so adding another From, Subject,
  Reply-To and so on breaks the signature instead of riding along under it.

The message is never rewritten; only the DKIM-Signature fields are put in front of it. For
canonicalization alone a bare CR or LF counts as CRLF and a missing final CRLF as present,
because that is how ``sender._wire_py.dot_stuff`` puts the message on the wire, and the
receiver verifies what it received. The field is folded to lines of at most 78 characters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import idna
import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, utils

if TYPE_CHECKING:
    from .config import DkimConfig

__all__ = ["DkimError", "Key", "Signer", "load_key", "DEFAULT_HEADERS", "OVERSIGN", "MIN_RSA_BITS"]

DEFAULT_HEADERS: tuple[str, ...] = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "list-id", "list-unsubscribe",
    "list-unsubscribe-post", "feedback-id",
)
"""What ``h=`` covers when a key names no headers of its own (those present in the message)."""

OVERSIGN: frozenset[str] = frozenset({
    "from", "to", "cc", "subject", "date", "reply-to", "message-id", "list-unsubscribe",
    "list-unsubscribe-post",
})
"""Listed in ``h=`` once more than they occur: a verifier hashes the extra as an empty header,
so any instance added later breaks the signature."""

MIN_RSA_BITS = 1024
"""RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits (2048 is what to generate)."""

_WIDTH = 78                                     # longest line of the folded field, CRLF excluded
_LINE_END = re.compile(rb"\r\n|\r|\n")          # what the wire layer turns into CRLF
_WSP_RUN = re.compile(rb"[ \t]{2,}|\t")         # runs that relaxed canonicalization makes one SP
_FIELD_NAME = re.compile(r"[!-9;-~]+")          # RFC 5322 ftext: printable ASCII but ':'
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_DOMAIN = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)", re.S)    # innermost first; repeated for nesting
_ANGLE_ADDR = re.compile(r"<([^<>]*)>")
_PKCS1 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())


# Per key, fixed for its life: the key, its h= candidates (as bytes, as str, oversigned?) and
# the tags that come before t=.
_Plan = tuple["Key", tuple[tuple[bytes, str, bool], ...], list[str]]


class DkimError(ValueError):
    """A key file or entry is unusable; the message names the config key and the file."""


class Key(msgspec.Struct, frozen=True):
    """One loaded signing key. Build it with :func:`load_key`."""

    domain: str                 # lower case, A-labels: the d= value
    selector: str               # the s= value: the key is published at s._domainkey.d
    algorithm: str              # "rsa-sha256" or "ed25519-sha256"
    headers: tuple[str, ...]    # lower-case names for h=, "from" among them
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def load_key(domain: str, selector: str, key_file: str, headers: Iterable[str] = (),
             where: str = "dkim") -> Key:
    """Read a signing key for ``domain`` and ``selector``.

    Args:
      key_file: a PEM private key (RSA as PKCS#1 or PKCS#8, Ed25519 as PKCS#8), or a file
        holding only the base64 of a 32-byte Ed25519 seed (what dkimpy's ``dknewkey`` writes).
      headers: lower-case header names for ``h=``; empty means ``DEFAULT_HEADERS``.
      where: the config key naming the file, e.g. ``"dkim[0].key_file"``; problems with the
        domain, selector or headers are named beside it (``dkim[0].domain``, ...).

    Raises:
      DkimError: naming ``where`` and the file, when the file is missing, unreadable, empty,
        not a key, an unusable kind of key (EC, DSA, Ed448), encrypted, or an RSA key under
        ``MIN_RSA_BITS``; or naming the entry's field when the domain, selector or a header
        name is malformed or the headers leave out "from".
    """
    entry = where.removesuffix(".key_file")
    ascii_domain = _ascii_domain(domain)
    if ascii_domain is None or not _DOMAIN.fullmatch(ascii_domain):
        raise DkimError(f"{entry}.domain: {domain!r} is not a domain name")
    if not _SELECTOR.fullmatch(selector):
        raise DkimError(f"{entry}.selector: {selector!r} is not a selector (letters, digits, "
                        "'.', '-', '_')")
    names = _header_names(headers, f"{entry}.headers")
    private_key = _read_private_key(key_file, where)
    algorithm = "rsa-sha256" if isinstance(private_key, rsa.RSAPrivateKey) else "ed25519-sha256"
    return Key(ascii_domain, selector, algorithm, names, private_key)


class Signer:
    """Signs messages with the keys of their From: domain; built once, shared by deliveries."""

    def __init__(self, keys: Sequence[Key]) -> None:
        self.keys = tuple(keys)
        self._plans: dict[str, list[_Plan]] = {}
        for key in self.keys:
            names = tuple((h.encode("ascii"), h, h in OVERSIGN) for h in key.headers)
            tags = ["v=1;", f"a={key.algorithm};", "c=relaxed/relaxed;", f"d={key.domain};",
                    f"s={key.selector};"]
            self._plans.setdefault(key.domain, []).append((key, names, tags))

    @classmethod
    def from_config(cls, entries: Sequence[DkimConfig]) -> Signer | None:
        """A signer for the ``[[dkim]]`` entries, or None when there are none.

        Raises:
          DkimError: naming the entry (``dkim[1].key_file``, ...) of the first unusable key, or
            of a domain and selector given twice.
        """
        if not entries:
            return None
        keys: list[Key] = []
        seen: dict[tuple[str, str], int] = {}
        for i, e in enumerate(entries):
            key = load_key(e.domain, e.selector, e.key_file, e.headers, where=f"dkim[{i}].key_file")
            first = seen.setdefault((key.domain, key.selector.lower()), i)
            if first != i:
                raise DkimError(f"dkim[{i}].selector: {e.selector!r} is already used for "
                                f"{key.domain} by dkim[{first}]")
            keys.append(key)
        return cls(keys)

    def sign(self, message: bytes, now: float) -> bytes:
        """The message with one DKIM-Signature header per key of its signing domain prepended
        (``message`` itself, unchanged, if none applies)."""
        sigs = self.signatures(message, now)
        return b"".join(sigs) + message if sigs else message

    def signatures(self, message: bytes, now: float) -> list[bytes]:
        """Just the DKIM-Signature header fields (each ending CRLF), for callers that write
        them themselves; [] when no key applies."""
        fields, body = _split(message)
        plans = self._plans_for(fields)
        if not plans:
            return []
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode("ascii")
        t = f"t={int(now)};"
        by_name: dict[bytes, list[bytes]] = {}
        for name, value in fields:
            by_name.setdefault(name, []).append(value)
        out = []
        for key, names, tags in plans:
            hashed: list[bytes] = []
            listed: list[str] = []
            for raw, name, oversign in names:
                values = by_name.get(raw, ())
                for value in reversed(values):          # bottom-up, RFC 6376 §5.4.2
                    hashed.append(_relaxed_header(raw, value))
                listed.extend([name] * (len(values) + oversign))
            lines = _fold(tags, t, listed, body_hash)
            # RFC 6376 §3.7: the field as sent, relaxed, b= empty, no trailing CRLF.
            unfolded = "".join(lines)[len("DKIM-Signature:"):] + " b="
            hashed.append(_relaxed_header(b"dkim-signature", unfolded.encode("ascii"))[:-2])
            digest = hashlib.sha256(b"".join(hashed)).digest()
            if key.algorithm == "ed25519-sha256":
                signature = key.private_key.sign(digest)
            else:
                signature = key.private_key.sign(digest, _PKCS1, _PREHASHED_SHA256)
            lines.extend(_fill(" b=", base64.b64encode(signature).decode("ascii")))
            out.append(("\r\n".join(lines) + "\r\n").encode("ascii"))
        return out

    def domain_for(self, message: bytes) -> str | None:
        """The configured domain whose keys would sign ``message`` (its d=), or None."""
        plans = self._plans_for(_split(message)[0])
        return plans[0][0].domain if plans else None

    def _plans_for(self, fields: list[list[bytes]]) -> list[_Plan] | None:
        """The plans of the domain that signs a message with these header fields."""
        froms = [value for name, value in fields if name == b"from"]
        if len(froms) != 1:
            return None
        domain = _from_domain(froms[0])
        while domain:
            plans = self._plans.get(domain)
            if plans:
                return plans
            domain = domain.partition(".")[2]
        return None


# ---------------------------------------------------------------------- keys


def _read_private_key(key_file: str, where: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        data = Path(key_file).read_bytes()
    except FileNotFoundError:
        raise DkimError(f"{where}: {key_file}: no such file") from None
    except IsADirectoryError:
        raise DkimError(f"{where}: {key_file}: is a directory, not a key file") from None
    except OSError as e:
        raise DkimError(f"{where}: {key_file}: cannot be read ({e.strerror or e})") from None
    text = data.strip()
    if not text:
        raise DkimError(f"{where}: {key_file}: the file is empty")
    if b"-----BEGIN" in text:
        if b"PRIVATE KEY-----" not in text:
            raise DkimError(f"{where}: {key_file}: holds a public key or certificate, "
                            "not a private key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise DkimError(f"{where}: {key_file}: the key is encrypted; give an unencrypted "
                            "one (openssl pkey -in FILE -out PLAIN)") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise DkimError(f"{where}: {key_file}: not a readable PEM private key ({e})") from None
    else:
        try:
            seed = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise DkimError(f"{where}: {key_file}: not a key (neither a PEM private key nor "
                            "the base64 of a 32-byte Ed25519 seed)") from None
        if len(seed) != 32:
            raise DkimError(f"{where}: {key_file}: base64 of {len(seed)} bytes, not a 32-byte "
                            "Ed25519 seed")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimError(f"{where}: {key_file}: RSA key of {key.key_size} bits is too short "
                            f"(RFC 8301 wants at least {MIN_RSA_BITS}; generate 2048)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimError(f"{where}: {key_file}: {_kind(key)} key cannot sign DKIM "
                    "(use RSA or Ed25519)")


def _kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC ({key.curve.name})"
    if isinstance(key, dsa.DSAPrivateKey):
        return "a DSA"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "an Ed448"
    return f"a {type(key).__name__}"


def _header_names(headers: Iterable[str], where: str) -> tuple[str, ...]:
    names: list[str] = []
    for i, h in enumerate(headers):
        name = h.lower()
        if not _FIELD_NAME.fullmatch(name):
            raise DkimError(f"{where}[{i}]: {h!r} is not a header field name")
        if name not in names:
            names.append(name)
    if not names:
        return DEFAULT_HEADERS
    if "from" not in names:
        raise DkimError(f"{where}: must include \"from\" (RFC 6376 §5.4: From is always signed)")
    return tuple(names)


# ---------------------------------------------------------------------- messages


def _split(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """``([[lower-case name, unfolded value], ...], body)``, line ends made CRLF as on the wire.
    Lines of the header block without a colon are skipped."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        message = _LINE_END.sub(b"\r\n", message)        # a copy: the message is not changed
    if message.startswith(b"\r\n"):
        head, body = b"", message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        head, body = (message, b"") if end < 0 else (message[:end], message[end + 4:])
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += line                     # unfolding drops only the CRLF
            continue
        name, colon, value = line.partition(b":")
        if colon:
            fields.append([name.rstrip(b" \t").lower(), value])
    return fields, body


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2 for a lower-case name and an unfolded value, CRLF included."""
    return name + b":" + _WSP_RUN.sub(b" ", value).strip(b" ") + b"\r\n"


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 for a body whose line ends are all CRLF (``_split`` sees to that); a
    last line without CRLF gets one.

    Plain ``bytes.replace`` rather than a regex: re tries a character class at every offset,
    which made this 6x slower on a 50 KB body."""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    while b"  " in body:                        # each pass halves every run of spaces
        body = body.replace(b"  ", b" ")
    if b" \r\n" in body:                        # now at most one space ends a line
        body = body.replace(b" \r\n", b"\r\n")
    # Trailing blanks of a last line without CRLF, as it will be sent; then the empty lines
    # at the end (with no bare CR or LF left, a run of them is a run of CRLFs).
    body = body.rstrip(b" ").rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def _from_domain(value: bytes) -> str | None:
    """The domain of the (first) address in a From: value, A-labels, lower case."""
    text = _QUOTED.sub('""', value.decode("utf-8", "replace"))
    while (uncommented := _COMMENT.sub(" ", text)) != text:
        text = uncommented
    angle = _ANGLE_ADDR.search(text)
    address = angle.group(1) if angle else text.split(",")[0]
    local, at, domain = address.rpartition("@")
    if not at or not local.strip():
        return None
    return _ascii_domain(domain)


def _ascii_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".")
    if domain.isascii():
        return domain.lower() or None
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


def _fold(tags: list[str], t: str, names: list[str], body_hash: str) -> list[str]:
    """The lines of the field up to bh=, folded between tags (and inside h= after a colon)."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for tag in (*tags, t):
        if len(line) + 1 + len(tag) > _WIDTH:
            lines.append(line)
            line = ""
        line += " " + tag
    h = "h=" + ":".join(names) + ";"
    if len(line) + 1 + len(h) <= _WIDTH:
        line += " " + h
    else:
        parts = [f"{name}:" for name in names]
        parts[0], parts[-1] = "h=" + parts[0], parts[-1][:-1] + ";"
        sep = " "
        for part in parts:
            if len(line) + len(sep) + len(part) > _WIDTH:
                lines.append(line)
                line, sep = "", " "
            line += sep + part
            sep = ""
    bh = f"bh={body_hash};"
    if len(line) + 1 + len(bh) <= _WIDTH:
        lines.append(line + " " + bh)
    else:
        lines.append(line)
        lines.extend(_fill(" bh=", body_hash + ";"))
    return lines


def _fill(start: str, text: str) -> list[str]:
    """``start + text`` as lines of at most _WIDTH, breaking ``text`` (base64) anywhere."""
    room = _WIDTH - len(start)
    lines = [start + text[:room]]
    for i in range(room, len(text), _WIDTH - 1):
        lines.append(" " + text[i:i + _WIDTH - 1])
    return lines
