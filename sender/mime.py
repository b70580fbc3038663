"""Resend-style JSON payloads in, RFC 5322 messages out.

``build_message(payload)`` checks a ``POST /emails`` body (``from``, ``to``, ``cc``, ``bcc``,
``reply_to``, ``subject``, ``html``, ``text``, ``headers``, ``attachments``, ``tags``) and turns
it into the bytes :meth:`sender.engine.Engine.submit` takes, with the envelope beside them:

- text only gives ``text/plain``, html only ``text/html``, both ``multipart/alternative`` (text
  first); attachments wrap that in ``multipart/mixed``, each part base64 with
  ``Content-Disposition: attachment``;
- headers are From, To, Cc, Reply-To, Subject, Date, Message-ID, MIME-Version and the caller's
  own; Bcc recipients are in the envelope only;
- non-ASCII display names and subjects are RFC 2047 encoded, non-ASCII file names RFC 2231;
  an internationalized domain is sent as its A-labels, and a non-ASCII local part makes the
  message SMTPUTF8 (RFC 6531/6532: headers then carry raw UTF-8).

Every refusal is a :class:`MimeError` whose ``field`` is the JSON path of the culprit
(``to[2]``, ``headers.X-Foo``, ``attachments[0].content``), so the HTTP layer can answer 422
naming it. Nothing else escapes: any JSON value gives a ``Built`` or a ``MimeError``.

Header injection is refused rather than cleaned: a CR, LF or NUL anywhere in a header name,
value, address or file name is an error, never silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import functools
import ipaddress
import mimetypes
import re
import secrets
import time
from datetime import datetime, timezone
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import idna
import msgspec

from .errors import UsageError

__all__ = ["MimeError", "Built", "parse_address", "build_message", "summary", "MAX_RECIPIENTS"]

MAX_RECIPIENTS = 50
"""Most addresses one of ``to``, ``cc``, ``bcc`` may hold (Resend's limit for ``to``)."""

_IGNORED = frozenset({"tags", "scheduled_at"})  # Resend knows them; they do not shape the message
_UNSUPPORTED = frozenset({"react"})
_USED = frozenset({"from", "to", "cc", "bcc", "reply_to", "subject", "html", "text",
                   "headers", "attachments"})

# Headers this module writes itself, or that the email package parses as structured fields
# (a caller's value there would either fight ours or trip the parser).
_RESERVED = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version", "reply-to",
    "sender", "return-path", "orig-date",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc",
    "resent-message-id",
})

_FIELD_NAME = re.compile(r"[!-9;-~]+")                   # RFC 5322 ftext: printable but ':'
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\U0010ffff]+")
_QCONTENT = re.compile(r'(?:[ !#-\[\]-~\x80-\U0010ffff]|\\[ -~\x80-\U0010ffff])*')
_LDH = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MIME_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_INJECTION = re.compile(r"[\r\n\x00]")
# Other controls, C1 and the Unicode line separators: str.splitlines() breaks on some of them.
_CONTROL = re.compile(r"[\x01-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


class MimeError(UsageError, ValueError):
    """The payload is wrong; ``field`` is the JSON path of the part at fault."""

    def __init__(self, field: str, problem: str, /):
        super().__init__(f"{_show(field)}: {problem}")
        self.field = field
        self.problem = problem


class Built(msgspec.Struct, frozen=True):
    """A message ready for ``Engine.submit(sender, rcpts, message)``."""

    sender: str          # envelope sender: the bare address of ``from``
    rcpts: list[str]     # to + cc + bcc, de-duplicated case-insensitively, first spelling kept
    message: bytes       # CRLF line endings, no Bcc header
    message_id: str      # without the angle brackets
    smtputf8: bool       # an address has a non-ASCII local part: needs the SMTPUTF8 extension
    tags: dict[str, str] = {}


def _show(field: str) -> str:
    return field if field.isprintable() else repr(field)


def _check_text(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MimeError(field, "is not valid Unicode (lone surrogate)") from None


def _check_header_text(value: str, field: str) -> None:
    """Refuse what could end a header line early or make it unreadable."""
    _check_text(value, field)
    if _INJECTION.search(value):
        raise MimeError(field, "contains CR, LF or NUL (header injection)")
    if _CONTROL.search(value):
        raise MimeError(field, "contains a control character")


_CACHE_MAX = 10_000         # addresses and domains recur from message to message: parse each once
_ascii_domains: dict[str, str] = {}
_parsed: dict[str, tuple[str, str, str]] = {}


def _remember(cache: dict, key: str, value):
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


def _domain_to_ascii(domain: str, field: str) -> str:
    hit = _ascii_domains.get(domain)
    return hit if hit is not None else _remember(_ascii_domains, domain, _to_ascii(domain, field))


def _to_ascii(domain: str, field: str) -> str:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise MimeError(field, f"bad address literal {domain!r}") from None
        return domain
    labels = domain.translate(_IDNA_DOTS).split(".")
    if len(labels) < 2:
        raise MimeError(field, f"domain {domain!r} needs at least two labels")
    out = []
    for label in labels:
        if not label.isascii():
            try:
                label = idna.encode(label, uts46=True).decode("ascii")
            except (UnicodeError, idna.IDNAError) as e:
                raise MimeError(field, f"domain label {label!r} is not a valid IDNA label ({e})") from None
        if not _LDH.fullmatch(label) or len(label) > 63:
            raise MimeError(field, f"domain label {label!r} is not a valid host name label "
                                   "(letters, digits, inner hyphens; 1 to 63 octets)")
        out.append(label.lower())
    if out[-1].isdigit():
        raise MimeError(field, f"domain {domain!r} has a numeric top-level label")
    ascii_domain = ".".join(out)
    if len(ascii_domain) > 255:
        raise MimeError(field, f"domain is {len(ascii_domain)} octets, over 255")
    return ascii_domain


def _split_angle(value: str) -> tuple[str, str] | None:
    """``Name <addr>`` -> (name, addr); None when there is no angle address."""
    if not value.endswith(">"):
        return None
    quoted = escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "<" and not quoted:
            return value[:i], value[i + 1:-1]
    return None


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def _parse(value: object, field: str) -> tuple[str, str, str]:
    """Returns (display name, envelope address, local part as the header should carry it)."""
    if not isinstance(value, str):
        raise MimeError(field, f"must be a string, not {_json_type(value)}")
    hit = _parsed.get(value)
    return hit if hit is not None else _remember(_parsed, value, _parse_text(value, field))


def _parse_text(value: str, field: str) -> tuple[str, str, str]:
    _check_header_text(value, field)
    value = value.strip()
    if not value:
        raise MimeError(field, "is empty")
    display = ""
    split = _split_angle(value)
    if split is not None:
        display, value = split[0].strip(), split[1].strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            if not _QCONTENT.fullmatch(display[1:-1]):
                raise MimeError(field, "badly quoted display name")
            display = _unquote(display)
        elif '"' in display:
            raise MimeError(field, "badly quoted display name")
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise MimeError(field, f"{value!r} is not an address (local@domain)")
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"') or not _QCONTENT.fullmatch(local[1:-1]):
            raise MimeError(field, f"local part {local!r} is not a valid quoted string")
        header_local = _unquote(local)
    else:
        if not all(_ATEXT.fullmatch(atom) for atom in local.split(".")):
            raise MimeError(field, f"local part {local!r} is not a valid dot-atom "
                                   "(no spaces, no empty or special parts)")
        header_local = local
    if len(local.encode("utf-8")) > 64:
        raise MimeError(field, f"local part is {len(local.encode('utf-8'))} octets, over 64")
    address = f"{local}@{_domain_to_ascii(domain, field)}"
    if len(address.encode("utf-8")) > 254:
        raise MimeError(field, "address is over 254 octets")
    return display, address, header_local


def parse_address(value: str, field: str) -> tuple[str, str]:
    """Read ``a@b.com`` or ``Name <a@b.com>``.

    Returns:
      ``(display_name, address)``; the domain of the address is in A-labels, lower case.

    Raises:
      MimeError: naming ``field``, for anything RFC 5321 would not carry (or header injection).
    """
    display, address, _ = _parse(value, field)
    return display, address


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _address_list(payload: dict, name: str, *, required: bool = False,
                  limit: int | None = MAX_RECIPIENTS) -> list[tuple[str, str, str]]:
    value = payload.get(name)
    if value is None:
        if required:
            raise MimeError(name, "is required")
        return []
    if isinstance(value, str):
        return [_parse(value, name)]
    if not isinstance(value, list):
        raise MimeError(name, f"must be a string or an array of strings, not {_json_type(value)}")
    if required and not value:
        raise MimeError(name, "needs at least one address")
    if limit is not None and len(value) > limit:
        raise MimeError(name, f"has {len(value)} addresses, over the limit of {limit}")
    return [_parse(item, f"{name}[{i}]") for i, item in enumerate(value)]


def _optional_str(payload: dict, name: str) -> str | None:
    value = payload.get(name)
    if value is not None and not isinstance(value, str):
        raise MimeError(name, f"must be a string, not {_json_type(value)}")
    if value is not None:
        _check_text(value, name)
    return value


def _header_address(display: str, address: str, local: str) -> Address:
    return Address(display, username=local, domain=address.rpartition("@")[2])


def _read_attachment(path: object, folder: Path | None, field: str, budget: int) -> tuple[bytes, str]:
    """The bytes of a file named by ``path`` inside ``folder``, and its name. Nothing outside
    the folder is read: not through "..", an absolute path or a symbolic link."""
    if folder is None:
        raise MimeError(field, "is not allowed here (no attachment folder is configured; send content)")
    if not isinstance(path, str) or not path:
        raise MimeError(field, "must be a file name in the attachment folder")
    _check_header_text(path, field)
    root = folder.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise MimeError(field, "is outside the attachment folder")
    try:
        size = target.stat().st_size
        if not target.is_file():
            raise MimeError(field, "is not a file")
        if size > budget:
            raise MimeError("message", f"message is at least {size} bytes, over the limit")
        return target.read_bytes(), target.name
    except OSError as e:
        raise MimeError(field, f"cannot be read: {e.strerror}") from None


def _attachments(value: object, budget: int, folder: Path | None = None) -> list[tuple[bytes, str, str, str]]:
    """Returns (data, maintype, subtype, filename) for each attachment."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise MimeError("attachments", f"must be an array, not {_json_type(value)}")
    out = []
    for i, item in enumerate(value):
        field = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise MimeError(field, f"must be an object, not {_json_type(item)}")
        for key in item:
            if key not in ("filename", "content", "content_type", "path"):
                raise MimeError(f"{field}.{key}", "is not a known field")
        if "path" in item:
            if "content" in item:
                raise MimeError(f"{field}.path", "give content or path, not both")
            data, name = _read_attachment(item["path"], folder, f"{field}.path", budget)
            item = {**item, "filename": item.get("filename", name),
                    "content": base64.b64encode(data).decode("ascii")}
        filename = item.get("filename")
        if not isinstance(filename, str):
            raise MimeError(f"{field}.filename",
                            "is required" if filename is None else
                            f"must be a string, not {_json_type(filename)}")
        _check_header_text(filename, f"{field}.filename")
        if not filename.strip():
            raise MimeError(f"{field}.filename", "is empty")
        content = item.get("content")
        if not isinstance(content, str):
            raise MimeError(f"{field}.content",
                            "is required" if content is None else
                            f"must be a base64 string, not {_json_type(content)}")
        if len(content) // 4 * 3 > budget:
            raise MimeError("message", f"message is at least {len(content) // 4 * 3} bytes, "
                                       f"over the limit of {budget}")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise MimeError(f"{field}.content", "is not valid base64") from None
        budget -= len(data)
        ctype = item.get("content_type")
        if ctype is None:
            ctype = mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"
        elif not isinstance(ctype, str):
            raise MimeError(f"{field}.content_type", f"must be a string, not {_json_type(ctype)}")
        match = _MIME_TYPE.fullmatch(ctype.strip())
        if match is None:
            _check_header_text(ctype, f"{field}.content_type")
            raise MimeError(f"{field}.content_type", f"{ctype!r} is not a type/subtype")
        maintype, subtype = match[1].lower(), match[2].lower()
        if maintype == "multipart":
            raise MimeError(f"{field}.content_type", "may not be multipart")
        out.append((data, maintype, subtype, filename))
    return out


def _custom_headers(value: object) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise MimeError("headers", f"must be an object, not {_json_type(value)}")
    out = []
    for name, text in value.items():
        field = f"headers.{name}"
        _check_header_text(name, field)
        if not _FIELD_NAME.fullmatch(name):
            raise MimeError(field, "is not a header field name (printable ASCII, no colon)")
        lowered = name.lower()
        if lowered in _RESERVED or lowered.startswith("content-"):
            hint = " (use reply_to)" if lowered == "reply-to" else ""
            raise MimeError(field, f"may not be set here{hint}")
        if not isinstance(text, str):
            raise MimeError(field, f"must be a string, not {_json_type(text)}")
        _check_header_text(text, field)
        out.append((name, text))
    return out


# ---------------------------------------------------------------------------- the direct writer
#
# The common message (ASCII addresses, no attachments) is written straight to bytes: the
# stdlib email package spent most of the HTTP API's CPU parsing back the headers it had just
# been given. Attachments and SMTPUTF8 messages still go through it. tests/test_mime.py checks
# that both writers' messages read back the same.

_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]*")
_WORD_BYTES = 45            # UTF-8 bytes per encoded word: base64 60 + 12 around = 72 <= 75
_SHORT_NAME = 42            # bytes of a non-ASCII display name written as one encoded word


def _first_word_bytes(name: str) -> int:
    """UTF-8 bytes for an encoded word that fits on the line after ``Name: ``: readers keep
    white space that folds right after the colon, so the value must start on that line."""
    return min(_WORD_BYTES, max(3, (78 - len(name) - 2 - 12) // 4 * 3))


def _encoded_words(text: str, first: int = _WORD_BYTES) -> list[str]:
    """RFC 2047 B encoded words of ``text`` (UTF-8), none splitting a character; the first
    holds at most ``first`` bytes."""
    words, chunk, size, limit = [], [], 0, first
    for ch in text:
        n = len(ch.encode("utf-8"))
        if size + n > limit and chunk:
            words.append("".join(chunk))
            chunk, size, limit = [], 0, _WORD_BYTES
        chunk.append(ch)
        size += n
    if chunk:
        words.append("".join(chunk))
    return [f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode()}?=" for w in words]


def _fold(name: str, tokens: list[str], sep: str) -> bytes:
    """``Name: token<sep>token...`` folded before a token that would pass 78 octets."""
    out = f"{name}:"
    line = len(out)
    for i, token in enumerate(tokens):
        piece = (sep if i else "") + token
        if i and line + len(piece) + 1 > 78:
            out += sep.rstrip() + "\r\n "
            piece = token
            line = 1
        else:
            piece = " " + piece if i == 0 else piece
        out += piece
        line += len(piece)
    return (out + "\r\n").encode("ascii")


def _unstructured(name: str, value: str) -> bytes:
    words = value.split(" ")
    if value.isascii() and not re.search(r"=\?|[^ -~]", value) and max(map(len, words)) <= 70:
        return _fold(name, words, " ") if value else f"{name}: \r\n".encode()
    return _fold(name, _encoded_words(value, _first_word_bytes(name)), " ")


def _mailbox(display: str, local: str, address: str, first: int = _WORD_BYTES) -> list[str]:
    addr = f"<{local}@{address.rpartition('@')[2]}>"
    if not display:
        return [addr[1:-1]]
    if display.isascii() and _PHRASE.fullmatch(display) and "=?" not in display:
        words = display.split()
    elif display.isascii() and "=?" not in display:
        words = ['"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"']
    else:
        words = _encoded_words(display, first)
    return words + [addr]


def _address_header(name: str, mailboxes: list[tuple[str, str, str]]) -> bytes:
    """An address list; it may fold between the words of an address and between addresses."""
    tokens: list[str] = []
    for i, (display, address, local) in enumerate(mailboxes):
        words = _mailbox(display, local, address, _first_word_bytes(name) if i == 0 else _WORD_BYTES)
        if i < len(mailboxes) - 1:
            words[-1] += ","
        tokens += words
    return _fold(name, tokens, " ")


def _text_part(content: str, subtype: str) -> bytes:
    body = content.replace("\r\n", "\n").replace("\r", "\n")
    raw = body.encode("utf-8")
    if raw.isascii() and all(len(line) <= 78 for line in raw.split(b"\n")) and not re.search(
            rb"[ \t]\n|^\.|^From ", raw, re.M):
        cte, data = "7bit", raw.replace(b"\n", b"\r\n")
    else:
        cte = "quoted-printable"
        data = binascii.b2a_qp(raw, istext=True).replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
            .encode() + data)


def _plain(value: str) -> bool:
    """No white space at either end or twice in a row: the direct writer's values (readers
    treat such white space as folding, and the email package has its own ways with it)."""
    return value == value.strip() and not re.search(r"\s\s", value)


def _write_message(from_, to, cc, reply_to, subject: str, headers: list[tuple[str, str]],
                   text: str | None, html: str | None, date: str, message_id: str) -> bytes:
    out = [_address_header("From", [from_]), _address_header("To", to)]
    if cc:
        out.append(_address_header("Cc", cc))
    if reply_to:
        out.append(_address_header("Reply-To", reply_to))
    out += [_unstructured("Subject", subject), f"Date: {date}\r\nMessage-ID: <{message_id}>\r\n".encode()]
    out += [_unstructured(name, value) for name, value in headers]
    out.append(b"MIME-Version: 1.0\r\n")
    if text is not None and html is not None:
        boundary = f"=_{secrets.token_hex(12)}"
        out.append(f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode())
        for part in (_text_part(text, "plain"), _text_part(html, "html")):
            out += [f"--{boundary}\r\n".encode(), part]
        out.append(f"--{boundary}--\r\n".encode())
    else:
        out.append(_text_part(text, "plain") if text is not None else _text_part(html, "html"))
    return b"".join(out)


def build_message(payload: dict, *, message_id_domain: str, now: float | None = None,
                  max_bytes: int = 40 * 1024 * 1024, attachment_folder: str | Path | None = None) -> Built:
    """Check a Resend ``POST /emails`` body and build the message it describes.

    Args:
      message_id_domain: the right-hand side of the Message-ID (our own domain).
      now: the Date header's time, seconds since the epoch; the current time when None.
      max_bytes: the largest message, in bytes as built.
      attachment_folder: where ``attachments[].path`` may read files (None: nowhere).

    Returns:
      The envelope and the message bytes, CRLF throughout, no line over 78 octets.

    Raises:
      MimeError: naming the field at fault; ``message`` when the result is over ``max_bytes``.
    """
    if not isinstance(payload, dict):
        raise MimeError("payload", f"must be an object, not {_json_type(payload)}")
    for key in payload:
        if key in _UNSUPPORTED:
            raise MimeError(key, f"{key} is not supported")
        if key not in _USED and key not in _IGNORED:
            raise MimeError(key, "is not a known field")
    tags = _tags(payload.get("tags"))

    sender = payload.get("from")
    if sender is None:
        raise MimeError("from", "is required")
    from_ = _parse(sender, "from")
    to = _address_list(payload, "to", required=True)
    cc = _address_list(payload, "cc")
    bcc = _address_list(payload, "bcc")
    reply_to = _address_list(payload, "reply_to")

    subject = payload.get("subject")
    if not isinstance(subject, str):
        raise MimeError("subject", "is required" if subject is None else
                        f"must be a string, not {_json_type(subject)}")
    _check_header_text(subject, "subject")
    text = _optional_str(payload, "text")
    html = _optional_str(payload, "html")
    if text is None and html is None:
        raise MimeError("text", "one of html or text is required")
    headers = _custom_headers(payload.get("headers"))
    text_bytes, html_bytes = len((text or "").encode("utf-8")), len((html or "").encode("utf-8"))
    budget = max_bytes - text_bytes - html_bytes
    if budget < 0:
        raise MimeError("html" if html_bytes > text_bytes else "text", f"the message would be at least "
                        f"{max_bytes - budget} bytes, over the limit of {max_bytes}")
    attachments = _attachments(payload.get("attachments"), budget,
                               Path(attachment_folder) if attachment_folder else None)

    everyone = [from_, *to, *cc, *bcc, *reply_to]
    smtputf8 = any(not local.isascii() for _, _, local in everyone)

    when = time.time() if now is None else now
    message_id = f"{int(when * 1000):x}.{secrets.token_hex(10)}@{message_id_domain}"
    date = _date(int(when))
    names = [d for d, _, _ in (from_, *to, *cc, *reply_to)]
    plain = [subject, *(value for _, value in headers), *names]
    # A non-ASCII display name must fit one encoded word: readers disagree on the white space
    # between the words of a phrase.
    short = all(d.isascii() or len(d.encode("utf-8")) <= _SHORT_NAME for d in names)
    if not attachments and not smtputf8 and not _stdlib_only and short and all(map(_plain, plain)):
        raw = _write_message(from_, to, cc, reply_to, subject, headers, text, html, date, message_id)
    else:
        raw = _stdlib_message(from_, to, cc, reply_to, subject, headers, text, html, attachments, date,
                              message_id, smtputf8)
    if len(raw) > max_bytes:
        raise MimeError("message", f"message is {len(raw)} bytes, over the limit of {max_bytes}")

    rcpts: list[str] = []
    seen: set[str] = set()
    for _, address, _ in (*to, *cc, *bcc):
        if address.lower() not in seen:
            seen.add(address.lower())
            rcpts.append(address)
    return Built(sender=from_[1], rcpts=rcpts, message=raw, message_id=message_id,
                 smtputf8=smtputf8, tags=tags)


_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")


def _tags(value: object) -> dict[str, str]:
    """Resend's ``tags``: ``[{"name": ..., "value": ...}]``, each of ASCII letters, digits,
    underscores and dashes, at most 256 characters."""
    if value is None:
        return {}
    if not isinstance(value, list):
        raise MimeError("tags", f"must be an array, not {_json_type(value)}")
    out: dict[str, str] = {}
    for i, tag in enumerate(value):
        if not isinstance(tag, dict) or set(tag) - {"name", "value"} or "name" not in tag:
            raise MimeError(f"tags[{i}]", "must be an object with a name and a value")
        for part in ("name", "value"):
            v = tag.get(part, "")
            if not isinstance(v, str) or not _TAG.fullmatch(v):
                raise MimeError(f"tags[{i}].{part}", "must be 1 to 256 ASCII letters, digits, underscores or dashes")
        out[tag["name"]] = tag["value"]
    return out


def summary(message: bytes) -> dict[str, str]:
    """The From, To and Subject header fields of ``message`` (unfolded, RFC 2047 words
    decoded), for events and status queries; a field that is missing is left out."""
    end = message.find(b"\r\n\r\n")
    head = b"\r\n" + (message[:end] if end >= 0 else message[:64 * 1024]) + b"\r\n"
    out: dict[str, str] = {}
    for field, spellings in _SUMMARY_FIELDS:
        # The usual spellings by a fast find; any other case by a scan of the field names.
        at = next((i for s in spellings if (i := head.find(s)) >= 0), -1)
        if at < 0:
            at = _find_field(head, field)
            if at < 0:
                continue
        start = head.index(b":", at + 2) + 1
        stop = head.find(b"\r\n", start)
        while head[stop + 2:stop + 3] in (b" ", b"\t"):
            stop = head.find(b"\r\n", stop + 2)
        text = head[start:stop].replace(b"\r\n", b"").strip().decode("utf-8", "replace")
        if "=?" in text:
            try:
                text = str(make_header(decode_header(text)))
            except (ValueError, LookupError):
                pass
        out[field] = text
    return out


_SUMMARY_FIELDS = [(name, [b"\r\n" + spelling + b":" for spelling in (name.title().encode(), name.encode(),
                                                                         name.upper().encode())])
                   for name in ("from", "to", "subject")]


def _find_field(head: bytes, field: str) -> int:
    """Where ``field`` starts in ``head`` (at its preceding CRLF), in any case; -1 if absent."""
    want = field.encode()
    at = head.find(b"\r\n")
    while at >= 0 and at + 2 < len(head):
        name, colon, _ = head[at + 2:at + 2 + len(want) + 1].partition(b":")
        if colon and name.lower() == want:
            return at
        at = head.find(b"\r\n", at + 2)
    return -1


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """The Date header's value: formatted once per second, not per message."""
    return format_datetime(datetime.fromtimestamp(second, timezone.utc))


_stdlib_only = False        # tests set it to compare the two writers


def _stdlib_message(from_, to, cc, reply_to, subject, headers, text, html, attachments, date, message_id,
                    smtputf8) -> bytes:
    """The message through the stdlib email package (attachments, SMTPUTF8)."""
    # 7bit bodies (quoted-printable or base64): no reliance on 8BITMIME at the next hop.
    policy = (email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP).clone(cte_type="7bit")

    msg = EmailMessage(policy=policy)
    msg["From"] = _header_address(*from_)
    msg["To"] = [_header_address(*a) for a in to]
    if cc:
        msg["Cc"] = [_header_address(*a) for a in cc]
    if reply_to:
        msg["Reply-To"] = [_header_address(*a) for a in reply_to]
    msg["Subject"] = subject
    msg["Date"] = date
    msg["Message-ID"] = f"<{message_id}>"
    for name, value in headers:
        msg[name] = value
    if text is not None:
        msg.set_content(text, subtype="plain", charset="utf-8")
        if html is not None:
            msg.add_alternative(html, subtype="html", charset="utf-8")
    else:
        msg.set_content(html, subtype="html", charset="utf-8")
    for data, maintype, subtype, filename in attachments:
        msg.add_attachment(data, maintype, subtype, filename=filename)

    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]              # the email package repeats it on each part
    return msg.as_bytes()
