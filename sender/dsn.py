"""Asynchronous bounces and complaints: what comes back after the remote already said 250.

``parse(bytes) -> Report`` reads one message that arrived at the bounce address and says what
it is and about whom:

- ``bounce``: an RFC 3464 delivery status notification (``multipart/report;
  report-type=delivery-status``), or one of the older free-text formats that MTAs and providers
  still send (Postfix, Exim, qmail, Sendmail, Exchange / Office 365, Gmail, Yahoo ...);
- ``complaint``: an ARF feedback report (RFC 5965), or an Amazon SES complaint notification;
- ``auto_reply``: an RFC 3834 automatic answer (vacation, out of office; one that says the
  mailbox is no longer in use takes ``inactive_mailbox``/``invalid_recipient`` as its category);
- ``delivery_report``: a DSN whose recipients were all delivered, relayed or expanded;
- ``unknown``: anything else.

Free-text bounces are read the same way whatever their origin: cut the notice from the copy of
the original message, find the failed addresses (on a line of their own, or at the start of one),
then take the reply text nearest to each; a few phrases per format only point at that text
("Remote host said:", "Remote Server returned '...'"). The remote's words are classified by
``sender.classify`` so that a bounce that arrives later lands in the same category as a reply
that came back during the SMTP transaction.

Nothing here raises on bad input: any bytes give a Report (``kind="unknown"`` at worst).

VERP: outbound mail uses the return path ``bounces+ID@BOUNCE_DOMAIN`` (``verp_address``), so a
bounce names the message even when its text names nobody; ``verp_id`` reads the ID back.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.parser
import email.policy
import html
import json
import re
from collections.abc import Container
from typing import Literal

import msgspec

from .classify import classify

__all__ = ["RecipientReport", "Report", "parse", "to_json", "verp_address", "verp_id"]

Kind = Literal["bounce", "complaint", "auto_reply", "delivery_report", "unknown"]

# What the stdlib email package raises on hostile input (unknown charsets, broken encoded words,
# bad base64 ...): caught where a header or a part is read, so that parse() never raises.
_EMAIL_ERRORS = (LookupError, ValueError, TypeError, email.errors.MessageError)

_MAX_DEPTH = 12           # MIME nesting we follow; deeper parts are ignored
_MAX_TEXT = 200_000       # characters of notification text we read
_MAX_LINE = 2_000         # characters of one line that the free-text heuristics look at
_MAX_RECIPIENTS = 500     # recipients we report from one message
_MAX_DIAG = 600           # characters of diagnostic text kept per recipient


class RecipientReport(msgspec.Struct):
    """What a report says about one recipient.

    ``category``/``permanent`` come from ``sender.classify`` for bounces; for the other kinds the
    category is the report's kind (``"complaint"``, ``"auto_reply"``, ``"delivery_report"``) and
    ``permanent`` is False: it describes a delivery failure, which those are not.
    """

    recipient: str | None        # the failed address (domain lower-cased), None if not found
    action: str | None           # RFC 3464 Action: failed / delayed / delivered / relayed / expanded
    status: str | None           # RFC 3463 status, e.g. "5.1.1"
    diagnostic: str | None       # the remote server's text, or the text found in the body
    category: str
    permanent: bool
    remote_mta: str | None = None
    reply_code: int | None = None
    original_recipient: str | None = None   # RFC 3464 Original-Recipient, when it differs


class Report(msgspec.Struct):
    kind: Kind
    original_message_id: str | None        # Message-ID of the message the report is about
    recipients: list[RecipientReport]
    feedback_type: str | None = None        # ARF Feedback-Type (abuse, opt-out, auth-failure ...)
    original_envelope_id: str | None = None
    verp_id: str | None = None              # from the envelope recipient, when parse() knows the domain


# --- VERP ---------------------------------------------------------------------------------------

_VERP_ID = re.compile(r"[0-9A-Za-z]+")


def verp_address(msg_id: str, bounce_domain: str, prefix: str = "bounces") -> str:
    """The return path that names ``msg_id``: ``bounces+ID@bounce_domain``.

    Raises:
      ValueError: the ID is not [0-9A-Za-z]+ (anything else would not survive every MTA).
    """
    if not _VERP_ID.fullmatch(msg_id):
        raise ValueError(f"VERP id must be [0-9A-Za-z]+, got {msg_id!r}")
    return f"{prefix}+{msg_id}@{bounce_domain.lower()}"


def verp_id(address: str, bounce_domain: str, prefix: str = "bounces") -> str | None:
    """The ID in ``bounces+ID@bounce_domain``, or None if ``address`` is not one of ours.

    Accepts the address with or without angle brackets; the prefix and domain compare without
    case, the ID keeps its case.
    """
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    local, at, domain = addr.rpartition("@")
    if not at or domain.lower() != bounce_domain.lower():
        return None
    head, plus, ident = local.partition("+")
    if not plus or head.lower() != prefix.lower() or not _VERP_ID.fullmatch(ident):
        return None
    return ident


# --- output -------------------------------------------------------------------------------------

def to_json(file: str, report: Report) -> dict:
    """The object ``sender dsn`` prints for one file."""
    out = {
        "file": file,
        "kind": report.kind,
        "original_message_id": report.original_message_id,
        "recipients": [
            {"recipient": r.recipient, "action": r.action, "status": r.status,
             "diagnostic": r.diagnostic, "category": r.category, "permanent": r.permanent}
            for r in report.recipients
        ],
    }
    if report.kind == "complaint":
        out["feedback_type"] = report.feedback_type
    return out


# --- regular expressions ------------------------------------------------------------------------

_LOCAL = r"[A-Za-z0-9!#$%&*+/=?^_{|}~-]+(?:\.[A-Za-z0-9!#$%&*+/=?^_{|}~-]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9]"
_ADDR = re.compile(rf"(?<![\w.+-])({_LOCAL})@({_DOMAIN}|\[[0-9A-Fa-f.:IPv]+\])(?![\w-])")
_STATUS = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?!\w|\.\d)")
_CODE_ANCHORED = re.compile(
    r"(?:^|said:|returned was:|server was:|response was:|returned '|returned \"|reason:|<<<|#|\(|error:)"
    r"\s*([245][0-5]\d)(?=[\s\-]|$)", re.I | re.M)
_CODE_ANY = re.compile(r"(?<![\w.\-:/=#@])([45][0-5]\d)(?=[ \-][^\d:]|[ \-]\d\.\d|$)", re.M)
_DIAG_TYPE = re.compile(r"^\s*[A-Za-z][\w-]{0,20}\s*;\s*")

_DAEMON = re.compile(
    r"^(?:mailer-daemon|mailer_daemon|mailerdaemon|mail-daemon|maildaemon|post_?master|"
    r"mail-delivery-system|mdaemon|mailer|bounces?|nobody|noreply-dmarc)$", re.I)
_DAEMON_NAME = re.compile(r"mail delivery (sub)?system|mailer.daemon|mail administrator|"
                          r"postmaster|delivery status notification", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|returned mail|return(ed)? to sender|delivery (status notification|"
    r"failure|failed|has failed|problem|notification)|failure notice|failed delivery|"
    r"mail delivery failed|non.?deliver|could not be delivered|couldn't be delivered|"
    r"not (be )?delivered|delivery error|mail system error|nicht zustellbar|"
    r"unzustellbar|rejected|bounced?|warning: could not send|mail failure|"
    r"message you sent|error sending|delivery report|permanent error|"
    r"notificaci[oó]n|non remis|echec|échec|не доставлено|未達|エラー|error", re.I)
_BOUNCE_BODY = re.compile(
    r"this message was created automatically by mail delivery software|"
    r"this is the qmail-send program|this is the mail system at host|"
    r"transcript of session follows|delivery has failed to these recipients|"
    r"could not be delivered to one or more|wasn't able to deliver|was not able to deliver|"
    r"unable to deliver|delivery to the following recipients? failed|"
    r"the following addresses had (permanent fatal errors|delivery problems)|"
    r"your message (could not|cannot|can't|wasn't|was not|did not) (be )?(delivered|reach)|"
    r"(could not|cannot|can't) be delivered|undeliver|permanent(ly)? (error|fail)|"
    r"failed permanently|delivery failed|the following message to .* was undeliverable|"
    r"diagnostic information for administrators|could not deliver|"
    r"your message did not reach|not delivered|mail delivery failed|"
    r"returned to sender|delivery status notification", re.I)
# A subject that says the notice is a warning, not the end ("Delivery Status Notification (Delay)")
_DELAY = re.compile(r"(?i)\bdelay(ed)?\b|warning: (could not send|message)|still (not )?(been )?"
                    r"(delivered|trying)|will (continue|keep) (trying|to try)|"
                    r"not yet been delivered|will be retried|will retry")
_AUTO_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ _-]?(reply|response|respons|antwort)|auto:|autoreply|autoresponder|"
    r"out of (the )?office|vacation|away (from|until)|i am away|i'm away|on leave|on holiday|"
    r"abwesenheit|r[ée]ponse automatique|risposta automatica|respuesta autom[aá]tica|"
    r"automatisch|fuera de la oficina|absence|自動応答|不在)", re.I)

# The start of the copy of the original message inside a free-text notice.
_ORIGINAL_START = re.compile(
    r"(?im)^[ \t]*(?:"
    r"-{2,}[^\n]{0,40}(?:below this line is a copy|this is a copy of|original message|"
    r"unsent message|returned message|message follows|header of the original|"
    r"original mail|message headers? follows?|copy of the message|undelivered message)[^\n]*"
    r"|(?:original (?:message|mail)|message headers?|unsent message|returned message)"
    r"(?: headers)?(?: (?:follows?|as follows|below))?[ \t]*[.:]?[ \t]*$"
    r"|the original message (headers|was|follows)[^\n]*:[ \t]*$"
    r")")

# Phrases before the remote's own words; the text after them is the diagnostic.
_ANCHORS = [
    # Exchange / Office 365: Remote Server returned '550 5.1.1 ...'
    re.compile(r"remote server returned '(.+)'", re.I),
    re.compile(r"(?:error that the other server returned was|response from the remote server was|"
               r"the response was|remote (?:host|server|mta) said(?:\s*\[[^\]\n]*\])?|"
               r"host [^\n]{1,120}? said|server replied|the server responded with|"
               r"remote server replied|following error message)\s*:\s*", re.I),
    # Exim and others: "... host mx.example.jp [192.0.2.20]: 550 5.7.0 ..."
    re.compile(r"\bhost:? [\w.-]+(?: \[[^\]\n]*\]| \([^)\n]*\))?:?\s+(?:reason:\s*)?"
               r"(?=[245]\d\d\b|[245]\.\d)", re.I),
    # a transcript: ">>> RCPT TO:<...>" then "<<< 550 ..." (TrendMicro writes "Received >>> 550")
    re.compile(r"(?:<<<|received\s*>>>)\s*(?=[245]\d\d\b)", re.I),
]
_RECIPIENT_HINT = re.compile(
    r"(?:to|recipients?|address(?:es)?|rcpt|failed|for|user|mailbox|delivering to|destination|"
    r"errors?|failures?)\W{0,4}$", re.I)


# --- small helpers ------------------------------------------------------------------------------

def _str(value) -> str:
    """A header value as text, whatever the parser handed back."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except _EMAIL_ERRORS:     # a Header in an unknown charset; nothing better to do
            return ""
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except _EMAIL_ERRORS:     # malformed encoded word: keep the raw text
            pass
    return text[:_MAX_LINE].encode("utf-8", "replace").decode("utf-8")


def _header(msg: email.message.Message, name: str) -> str:
    try:
        return _str(msg.get(name))
    except _EMAIL_ERRORS:
        return ""


def _headers(msg: email.message.Message, name: str) -> list[str]:
    try:
        return [_str(v) for v in msg.get_all(name) or []]
    except _EMAIL_ERRORS:
        return []


def _content_type(part: email.message.Message) -> str:
    try:
        return part.get_content_type().lower()
    except _EMAIL_ERRORS:
        return "text/plain"


def _decode(data: bytes, charset: str | None) -> str:
    for cs in (charset, "utf-8"):
        if not cs:
            continue
        try:
            return data.decode(cs, "replace")
        except (LookupError, ValueError, TypeError):
            continue
    return data.decode("latin-1")


def _part_text(part: email.message.Message) -> str:
    try:
        data = part.get_payload(decode=True)
    except _EMAIL_ERRORS:
        data = None
    if data is None:
        payload = part.get_payload()
        if isinstance(payload, str):
            return payload.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return ""
    try:
        charset = part.get_content_charset()
    except _EMAIL_ERRORS:
        charset = None
    text = _decode(data[: _MAX_TEXT * 4], charset)
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Bounded so that markup without closing brackets costs linear time, not quadratic.
_TAG = re.compile(r"<[^<>]{0,1000}>")
_BLOCK_TAG = re.compile(r"(?i)<\s*/?\s*(?:br|p|div|tr|li|h\d|hr|table|td)\b[^<>]{0,1000}>")
_MAILTO_TAG = re.compile(r"(?i)<a\s[^<>]{0,1000}?href=[\"']?mailto:([^\"'<> ]{1,320})[^<>]{0,1000}>")


def _drop_element(text: str, tag: str) -> str:
    """``text`` without the ``tag`` elements (to the end when one is not closed); linear time."""
    lower, out, i = text.lower(), [], 0
    opening, closing = re.compile(rf"<{tag}\b"), re.compile(rf"</{tag}\b[^<>]{{0,100}}>")
    while m := opening.search(lower, i):
        out.append(text[i:m.start()])
        end = closing.search(lower, m.end())
        i = end.end() if end else len(text)
        if not end:
            break
    return "".join(out) + text[i:] if out else text


def _html_text(text: str) -> str:
    """HTML made plain enough for the free-text heuristics: line breaks where blocks end,
    mailto: links as their addresses, no script, style or head."""
    text = text[:_MAX_TEXT]
    for tag in ("script", "style", "head"):
        text = _drop_element(text, tag)
    text = _BLOCK_TAG.sub("\n", text)
    text = _MAILTO_TAG.sub(r" \1 ", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    return re.sub(r"[ \t\xa0]+", " ", text)


def _norm_addr(local: str, domain: str) -> str:
    return f"{local}@{domain.lower()}"


def _first_addr(text: str) -> str | None:
    m = _ADDR.search((text or "")[:_MAX_LINE])
    return _norm_addr(m.group(1), m.group(2)) if m else None


def _status_of(text: str | None) -> str | None:
    m = _STATUS.search(text or "")
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _message_id_in(text: str) -> str | None:
    """The first Message-ID header in a block of header-ish text."""
    text = re.sub(r"\n[ \t]+", " ", text)
    m = re.search(r"(?im)^[ \t>]*message-id[ \t]*:[ \t]*(<[^<>\s]+>|[^\s<>]+@[^\s<>]+)", text)
    return m.group(1) if m else None


# --- the MIME walk ------------------------------------------------------------------------------

class _Parts:
    """What the MIME tree holds, sorted by what it is to us."""

    def __init__(self) -> None:
        self.texts: list[str] = []            # notification text, in order (HTML made plain)
        self.status: list[str] = []           # message/delivery-status bodies, as field text
        self.feedback: list[str] = []         # message/feedback-report bodies
        self.originals: list[email.message.Message | str] = []   # rfc822 message or its headers
        self.report_type: str | None = None

    def walk(self, part: email.message.Message, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            return
        ctype = _content_type(part)
        if ctype == "multipart/report" and self.report_type is None:
            try:
                self.report_type = (part.get_param("report-type") or "")
                self.report_type = _str(self.report_type).lower() or None
            except _EMAIL_ERRORS:
                pass
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            self.status.append(_fields_text(part))
        elif ctype == "message/feedback-report":
            self.feedback.append(_fields_text(part))
        elif ctype in ("message/rfc822", "message/global", "message/partial", "message/news"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
                self.originals.append(payload[0])
            elif isinstance(payload, str):
                self.originals.append(payload)
        elif ctype in ("text/rfc822-headers", "text/global-headers"):
            self.originals.append(_part_text(part))
        elif part.is_multipart():
            payload = part.get_payload()
            if not isinstance(payload, list):
                return
            if ctype == "multipart/alternative":
                plain = [p for p in payload if _content_type(p) == "text/plain"]
                if plain and _squash(_part_text(plain[0])):
                    payload = plain[:1]
                else:
                    payload = [p for p in payload if _content_type(p) != "text/plain"][:1] or payload
            for sub in payload:
                if isinstance(sub, email.message.Message):
                    self.walk(sub, depth + 1)
        elif ctype.startswith("multipart/"):
            # no boundary found: the parser left the whole body as text
            self.texts.append(_part_text(part))
        elif ctype == "text/html":
            self.texts.append(_html_text(_part_text(part)))
        elif ctype.startswith("text/") or ctype in ("message/disposition-notification",
                                                     "application/json"):
            self.texts.append(_part_text(part))

    def text(self) -> str:
        return "\n\n".join(self.texts)[:_MAX_TEXT]


def _short_lines(text: str) -> str:
    """The text with every line cut to _MAX_LINE characters: what the heuristics read, so that
    no pattern ever runs over a megabyte-long line."""
    if len(text) <= _MAX_LINE:
        return text
    return "\n".join(line[:_MAX_LINE] for line in text.split("\n"))


def _fields_text(part: email.message.Message) -> str:
    """A delivery-status or feedback-report body as ``Name: value`` lines in blank-line blocks."""
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = []
        for block in payload:
            if not isinstance(block, email.message.Message):
                continue
            lines = []
            try:
                for name, value in block.items():
                    lines.append(f"{name}: {_str(value)}")
            except _EMAIL_ERRORS:
                pass
            body = block.get_payload()
            if isinstance(body, str) and body.strip():
                lines.append(body)
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)
    return _part_text(part)


_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]{0,60})[ \t]*:[ \t]*(.*)$")


def _field_blocks(text: str) -> list[list[tuple[str, str]]]:
    """``Name: value`` lines split into blocks at blank lines; folded lines joined."""
    blocks: list[list[tuple[str, str]]] = []
    block: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line.strip():
            if block:
                blocks.append(block)
                block = []
            continue
        if line[:1] in " \t" and block:
            name, value = block[-1]
            if len(value) < _MAX_LINE:
                block[-1] = (name, f"{value} {line.strip()}"[:_MAX_LINE])
            continue
        m = _FIELD.match(line[:_MAX_LINE].strip())
        if m:
            block.append((m.group(1).lower(), m.group(2).strip()))
    if block:
        blocks.append(block)
    return blocks


# --- RFC 3464 -----------------------------------------------------------------------------------

_RCPT_FIELDS = {"final-recipient", "original-recipient", "action", "status", "diagnostic-code",
                "remote-mta", "last-attempt-date", "will-retry-until", "x-actual-recipient",
                "final-log-id"}


class _Dsn(msgspec.Struct):
    envelope_id: str | None = None
    records: list[dict[str, str]] = msgspec.field(default_factory=list)


def _read_dsn(text: str) -> _Dsn:
    """Per-message and per-recipient fields of delivery-status text.

    A field seen twice starts a new recipient, so recipients that are not separated by a blank
    line (it happens) still come out apart.
    """
    out = _Dsn()

    def flush(record: dict[str, str]) -> None:
        if "final-recipient" in record or "original-recipient" in record or (
                "action" in record and "status" in record):
            out.records.append(record)

    for block in _field_blocks(text):
        record: dict[str, str] = {}
        for name, value in block:
            if name == "original-envelope-id" and not out.envelope_id:
                out.envelope_id = value or None
            if name not in _RCPT_FIELDS:
                continue
            if name in record:
                flush(record)
                record = {}
            record[name] = value
        flush(record)
    return out


def _embedded_dsn(text: str) -> str:
    """Delivery-status fields written into a text part (a broken boundary, or no MIME at all)."""
    m = re.search(r"(?im)^(final-recipient|original-recipient)[ \t]*:", text)
    return text if m else ""


_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
# non-standard values seen in the wild: Postfix address verification, SendGrid
_ACTION_ALIASES = {"deliverable": "delivered", "undeliverable": "failed", "expired": "failed",
                   "failure": "failed", "bounced": "failed", "delay": "delayed"}


def _action(value: str | None, status: str | None) -> str | None:
    value = (value or "").strip().lower()
    word = re.match(r"[a-z]*", value).group(0)
    if word in _ACTION_ALIASES:
        return _ACTION_ALIASES[word]
    for a in _ACTIONS:
        if value.startswith(a):
            return a
    if status:
        return {"5": "failed", "4": "delayed", "2": "delivered"}.get(status[0])
    return None


def _strip_diag_type(value: str) -> str:
    return _DIAG_TYPE.sub("", value, count=1).strip()


def _reply_code(text: str) -> int | None:
    m = _CODE_ANCHORED.search(text) or _CODE_ANY.search(text)
    return int(m.group(1)) if m else None


def _choose_status(dsn_status: str | None, diag: str | None) -> str | None:
    """The DSN's Status, unless it is a bare x.0.0 and the remote's text says more."""
    found = _status_of(diag)
    if not dsn_status:
        return found
    if found and dsn_status.endswith(".0.0") and found[0] == dsn_status[0] and found != dsn_status:
        return found
    return dsn_status


def _remote_text(diag: str) -> str:
    """The reply text without its leading code and enhanced status, as classify() takes it."""
    return re.sub(r"^\s*[245]\d\d(?:[ \-]+[245]\.\d{1,3}\.\d{1,3})?[ \-]*", "", diag).strip() or diag


def _classified(action: str | None, status: str | None, diag: str | None,
                code: int | None) -> tuple[str, bool, str | None]:
    """(category, permanent, status) for a failed or delayed recipient."""
    text = diag or ""
    if code is None and text:
        code = _reply_code(text)
    c = classify(code or 0, _remote_text(text), status)
    permanent = c.permanent and action != "delayed"
    return c.category, permanent, status or (c.enhanced or None)


def _addr_field(value: str | None) -> str | None:
    if not value:
        return None
    return _first_addr(value.partition(";")[2] if ";" in value else value)


# --- free-text bounces --------------------------------------------------------------------------

# Headers that open the copy of the original message when no marker line precedes it.
_HEADER_BLOCK = re.compile(
    r"(?im)^(?:return-path|received|message-id|dkim-signature|from|to|date|subject|mime-version|"
    r"content-type|reply-to|x-[\w-]+)[ \t]*:.*\n(?:(?:[\w-]+[ \t]*:|[ \t]).*\n){2,}")
_KEY_HEADER = re.compile(r"(?im)^(?:return-path|received|message-id|dkim-signature|mime-version|"
                         r"x-[\w-]+)[ \t]*:")
_DSN_FIELD = re.compile(r"(?im)^(?:reporting-mta|final-recipient|original-recipient|action|status|"
                        r"diagnostic-code|remote-mta|arrival-date|x-postfix-[\w-]+)[ \t]*:")


def _split_original(text: str) -> tuple[str, str]:
    """(notice, copy of the original message) of a free-text bounce."""
    cuts = []
    m = _ORIGINAL_START.search(text)
    if m:
        cuts.append(m.start())
    for m in _HEADER_BLOCK.finditer(text):
        # a block of the original's headers: not MIME part headers, not inline DSN fields
        block = m.group(0)
        if (_KEY_HEADER.search(block) or block.count("\n") >= 6) and not _DSN_FIELD.search(block) \
                and re.search(r"(?im)^(?:from|to|subject|date|message-id|received)[ \t]*:", block):
            cuts.append(m.start())
            break
    if not cuts:
        return text, ""
    cut = min(cuts)
    return text[:cut], text[cut:]


class _Candidate(msgspec.Struct):
    addr: str
    line: int
    strength: int      # 2: the line is about this address; 1: named in a sentence
    before: str        # the line before the address
    rest: str          # the line after the address


_WRAPPERS = re.compile(r"(?i)mailto:|rcpt to:|[<>\[\]()\"'*,;:=\-\s.#>]|\d{1,3}[.)]|^[45]\d\d\b")
_LEAD_LABEL = re.compile(r"(?i)^(?:[>*\-#\s]*|[45]\d\d[ -]+|\d{1,3}[.)]\s*|[\w .,'\"-]{0,40}<mailto:|"
                         r"(?:original-|final-)?recipient(?: address)?\s*:|rcpt to\s*:|"
                         r"(?:e-?mail )?address\s*:|mailbox\s*:|user\s*:)\s*<?$")
_SENDER_LABEL = re.compile(r"(?i)(?:^|\b)(?:from|sender|reply-to|mail from|return-path|cc|"
                           r"envelope-from|smtp\.mailfrom)\s*[:=]?\s*<?$")


_COMMAND_ECHO = re.compile(r"(?i)^\s*>>>\s*(?:rcpt|mail|data|ehlo|helo|quit|rset)\b")


def _candidates(lines: list[str], exclude: set[str]) -> list[_Candidate]:
    """Addresses in the notice that the notice is about, with how sure we are of each."""
    found: list[_Candidate] = []
    for i, line in enumerate(lines):
        if "@" not in line or _COMMAND_ECHO.match(line):
            continue
        residue = _WRAPPERS.sub("", _ADDR.sub("", line))
        for m in _ADDR.finditer(line):
            if len(found) >= _MAX_RECIPIENTS:
                return found
            addr = _norm_addr(m.group(1), m.group(2))
            before, after = line[max(0, m.start() - 200): m.start()], line[m.end(): m.end() + 200]
            if addr.lower() in exclude or _DAEMON.match(m.group(1)) and \
                    not m.group(1).lower().startswith("postmaster"):
                continue
            if re.search(r"(?i)(expanded from:?|generated from|https?://\S*|[?&=/])\s*<?$", before):
                continue
            if re.search(r"(?i)mailto:$", before) and found and found[-1].line == i \
                    and found[-1].addr.lower() == addr.lower():
                continue
            if _SENDER_LABEL.search(before):
                continue
            lead = before.strip()
            if not residue or _LEAD_LABEL.match(lead) and not re.match(r"(?i)to\s*:", lead) \
                    or re.search(r"(?i)generated by\s*<?$", before):      # Exim: pipe or file
                strength = 2
            elif _RECIPIENT_HINT.search(before.rstrip(" <\"'")) or \
                    (re.search(r":\s*<?$", before) and not after.strip(" >.")):
                strength = 1
            else:
                strength = 0
            if strength:
                found.append(_Candidate(addr, i, strength, before, after))
    return found


def _after_addr(rest: str) -> str:
    rest = re.sub(r"^[>\"')\]]*\s*(?:<mailto:[^>]*>)?\s*(?:\.\.\.|:|,|-)?\s*", "", rest)
    # Exchange 2003: "addr on Thu, 29 Apr 2010 00:00:00 -0000" before the reason
    rest = re.sub(r"(?i)^on\s+[^\n]{0,40}?\d{1,2}:\d{2}(?::\d{2})?(?:\s*[ap]m)?(?:\s*[+-]\d{4})?\s*",
                  "", rest)
    return rest.strip()


# Amazon SES: "5.1.0 - Unknown address error 550-'5.2.2 <a@b>... Mailbox Full' (delivery attempts: 0)"
_QUOTED_REPLY = re.compile(r"(?<![\w.])([245]\d\d)-'([^']+)'")


def _focus(text: str) -> str:
    """The remote's own words inside a block of notice text."""
    text = re.sub(r"\s*Giving up on \[?[0-9A-Fa-f.:]+\]?\.?", "", text)      # qmail's own note
    m = _ANCHORS[0].search(text)
    if m:
        return m.group(1).strip()
    m = _QUOTED_REPLY.search(text)
    if m:
        return f"{m.group(1)} {m.group(2).strip()}"
    for anchor in _ANCHORS[1:]:
        m = anchor.search(text)
        if m and _informative(text[m.end():]):
            return text[m.end():].strip()
    m = re.search(r"(?i)\(reason:\s*(.*?)\)?\s*$", text)
    if m and m.group(1).strip():
        return m.group(1).strip()
    return text.strip()


def _usable(diag: str) -> bool:
    """A Diagnostic-Code worth keeping: words, or a reply with some text ("250 2.1.5 Ok")."""
    return _informative(diag) or _has_reply(diag) and bool(re.search(r"[A-Za-z]{2}", diag))


def _informative(text: str) -> bool:
    return bool(re.search(r"[^\W\d_]{3,}.*[^\W\d_]{3,}", text, re.S))


def _has_reply(text: str) -> bool:
    return bool(_STATUS.search(text) or _CODE_ANCHORED.search(text) or _CODE_ANY.search(text))


_SEPARATOR = re.compile(r"^\s*(?:[-=_*#~]{4,}.*|.*[-=_*#~]{4,}\s*)$")


def _paragraph(lines: list[str], start: int, step: int, stops: Container[int]) -> str:
    """The nearest paragraph from ``start`` going ``step`` (+1 down, -1 up): separator lines and
    short introductions that end with a colon ("because:", "Technical details:") are skipped."""
    j, out = start, []
    while 0 <= j < len(lines) and len(out) < 8 and abs(j - start) < 30:
        line = lines[j].strip()
        if j in stops:
            break
        if not line or _SEPARATOR.match(line) and not _informative(re.sub(r"[-=_*#~]", "", line)):
            if out:
                break
        elif _SEPARATOR.match(line) or line.endswith(":") and len(line) < 80 and not out:
            if out:
                break
            if step < 0:
                return ""         # the introduction of the address list: nothing about it
        else:
            out.append(line)
        j += step
    if step < 0:
        out.reverse()
    return _squash(" ".join(out))


def _block(lines: list[str], cand: _Candidate, stops: Container[int]) -> str:
    """The text about one candidate: what follows it on its line and the lines after, up to a
    blank line or the next address; the whole line when the address sits in a sentence."""
    if _SENDMAIL_LINE.match(lines[cand.line]):
        return _sendmail_block(lines, cand, stops)
    out = [_squash(lines[cand.line]) if cand.strength == 1 else _after_addr(cand.rest)]
    end = cand.line + 1
    while end < min(len(lines), cand.line + 10):
        line = lines[end]
        if end in stops or not line.strip() or _SEPARATOR.match(line):
            break
        out.append(line.strip())
        end += 1
    text = _squash(" ".join(out))
    if cand.strength == 1 and not _has_reply(text):
        # "There was an error delivering your mail to <x>." and the reason a paragraph below
        text = _squash(f"{text} {_paragraph(lines, end, 1, stops)}")
    elif cand.strength == 2 and not _informative(text):
        text = _paragraph(lines, end, 1, stops) or _paragraph(lines, cand.line - 1, -1, stops)
    return text


_SENDMAIL_LINE = re.compile(r"^\s*[45]\d\d[ -]+<[^<>\s]+>\.\.\.")


def _sendmail_block(lines: list[str], cand: _Candidate, stops: Container[int]) -> str:
    """Sendmail's transcript: ``550 <addr>... User unknown`` sums up one recipient on one line;
    the remote's own words are the ``<<<`` lines above it, back to ``While talking to``."""
    remote = []
    for j in range(cand.line - 1, max(-1, cand.line - 12), -1):
        line = lines[j].strip()
        if not line or j in stops or _SENDMAIL_LINE.match(line) or line.lower().startswith("while talking"):
            break
        if line.startswith("<<<"):
            remote.insert(0, line[3:].strip())
    return _squash(" ".join(remote + [_after_addr(cand.rest)]))


_FALLBACKS = [
    re.compile(r"(?m)^\s*<<<\s*([45]\d\d[ -].*)$"),
    re.compile(r"(?m)^[\s#(>*\-]*([45]\d\d[ -]+[45]\.\d{1,3}\.\d{1,3}.*)$"),
    re.compile(r"(?m)^[\s#(>*\-]*([45]\.\d{1,3}\.\d{1,3}[ -].*)$"),
    re.compile(r"(?m)^.*?\b([45]\d\d[ -][45]\.\d{1,3}\.\d{1,3}\b.*)$"),
    re.compile(r"(?m)^[\s#(>*\-]*([45]\d\d(?: -|-| )\s*[^\W\d].*)$"),
    re.compile(r"(?m)^[\s#(>*\-]*([45]\d\d[ -]+[^\s\d].*)$"),
    re.compile(r"(?im)^\s*(?:error|reason|diagnostic(?:[- ]code)?|problem)\s*:\s*(\S.*)$"),
]


def _global_diag(notice: str) -> str | None:
    """A diagnostic for a notice whose text is not next to the address (or has no address)."""
    lines = notice.split("\n")
    for i, line in enumerate(lines):
        if re.search(r"(?i)remote server returned '", line):
            joined = " ".join(x.strip() for x in [line] + _takewhile(lines[i + 1:i + 4]))
            m = _ANCHORS[0].search(joined)
            if m:
                return _squash(m.group(1))
    for anchor in _ANCHORS[1:]:
        for i, line in enumerate(lines):
            m = anchor.search(line)
            if not m:
                continue
            rest = line[m.end():].strip()
            if rest:        # "Remote host said: 550 ..." and its continuation lines
                text = _squash(" ".join([rest] + _takewhile(lines[i + 1:i + 6])))
            else:           # "The response from the remote server was:" and a paragraph below
                text = _paragraph(lines, i + 1, 1, set())
            if text:
                return text
    for pat in _FALLBACKS:
        m = pat.search(notice)
        if m:
            i = notice[: m.start(1)].count("\n")
            more = [x.strip() for x in _takewhile(lines[i + 1:i + 4])
                    if re.match(r"^\s+\S|^[45]\d\d[ -]", x)]
            return _squash(" ".join([m.group(1)] + more))
    return None


def _takewhile(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if not line.strip() or _SEPARATOR.match(line):
            break
        out.append(line)
    return out


class _Others:
    """The lines that name another recipient: the text about one recipient stops there."""

    __slots__ = ("by_line", "key")

    def __init__(self, by_line: dict[int, str], key: str) -> None:
        self.by_line = by_line
        self.key = key

    def __contains__(self, line: int) -> bool:
        return self.by_line.get(line, self.key) != self.key


def _free_text(notice: str, exclude: set[str], failed_hdr: list[str]) -> list[tuple[str | None, str | None]]:
    """(address, diagnostic) pairs from the notice of a free-text bounce."""
    lines = notice.split("\n")
    cands = _candidates(lines, exclude)
    if failed_hdr:
        wanted = {a.lower() for a in failed_hdr}
        cands = [c for c in cands if c.addr.lower() in wanted]
        top = {}
        for c in cands:
            top[c.addr.lower()] = max(top.get(c.addr.lower(), 0), c.strength)
        chosen = [c for c in cands if c.strength == top[c.addr.lower()]]
    else:
        best = max((c.strength for c in cands), default=0)
        chosen = [c for c in cands if c.strength == best]
    blocks: dict[str, list[str]] = {}
    order: list[str] = []
    by_line = {c.line: c.addr.lower() for c in chosen}
    for c in chosen:
        key = c.addr.lower()
        if key not in blocks:
            blocks[key] = []
            order.append(c.addr)
        text = _block(lines, c, _Others(by_line, key))
        if text:
            blocks[key].append(text)
    for a in failed_hdr:
        if a.lower() not in blocks:
            blocks[a.lower()] = []
            order.append(a)
    glob: str | None = None
    out: list[tuple[str | None, str | None]] = []
    for addr in order:
        texts = blocks[addr.lower()]
        pick = next((t for t in texts if _has_reply(t) and _informative(t)), None)
        if pick is None:
            pick = next((t for t in texts if _informative(t)), None)
            if glob is None:
                glob = _global_diag(notice) or ""
            if glob and (pick is None or _has_reply(glob) or len(order) == 1):
                pick = glob
        out.append((addr, _focus(pick)[:_MAX_DIAG] if pick else None))
    if not out:
        glob = _global_diag(notice)
        if glob:
            out.append((None, _focus(glob)[:_MAX_DIAG]))
    return out


# --- ARF and provider notifications --------------------------------------------------------------

def _ses_json(text: str) -> dict | None:
    """An Amazon SES (via SNS) notification carried as JSON in the body, if that is what it is."""
    i = text.find('{"notificationType"')
    if i < 0:
        i = text.find('{"eventType"')
    if i < 0:
        m = re.search(r'\{\s*"(?:notificationType|eventType)"', text)
        if not m:
            return None
        i = m.start()
    body = text[i:].replace("!\n ", "")    # SNS folds long lines with "!\n "
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except (ValueError, RecursionError):        # not JSON, or nested too deep to be SES
        return None
    return obj if isinstance(obj, dict) else None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _ses_report(obj: dict) -> Report | None:
    """The Report for an SES notification (JSON fields of any type are taken with care: the
    body is whatever the sender of the mail wrote)."""
    ntype = str(obj.get("notificationType") or obj.get("eventType") or "").lower()
    mail = _dict(obj.get("mail"))
    msg_id = None
    common = _dict(mail.get("commonHeaders"))
    if isinstance(common.get("messageId"), str):
        msg_id = common["messageId"]
    for h in _list(mail.get("headers")):
        if isinstance(h, dict) and str(h.get("name", "")).lower() == "message-id":
            msg_id = str(h.get("value"))
    if ntype == "complaint":
        c = _dict(obj.get("complaint"))
        rcpts = [_first_addr(str(_dict(r).get("emailAddress"))) for r in _list(c.get("complainedRecipients"))]
        return Report("complaint", msg_id,
                      [RecipientReport(r, None, None, None, "complaint", False)
                       for r in [r for r in rcpts if r] or [None]],
                      feedback_type=str(c.get("complaintFeedbackType") or "") or None)
    if ntype == "bounce":
        b = _dict(obj.get("bounce"))
        out = []
        for r in _list(b.get("bouncedRecipients"))[:_MAX_RECIPIENTS]:
            if not isinstance(r, dict):
                continue
            diag = _strip_diag_type(str(r.get("diagnosticCode") or "")) or None
            status = _status_of(str(r.get("status") or "")) or _status_of(diag)
            action = _action(str(r.get("action") or ""), status) or "failed"
            code = _reply_code(diag or "")
            cat, perm, status = _classified(action, status, diag, code)
            if str(b.get("bounceType", "")).lower() == "transient":
                perm = False
            out.append(RecipientReport(_first_addr(str(r.get("emailAddress") or "")), action,
                                       status, diag, cat, perm, reply_code=code))
        return Report("bounce", msg_id, out)
    if ntype == "delivery":
        d = _dict(obj.get("delivery"))
        resp = str(d.get("smtpResponse") or "") or None
        return Report("delivery_report", msg_id,
                      [RecipientReport(_first_addr(str(r)), "delivered", _status_of(resp), resp,
                                       "delivery_report", False, reply_code=_reply_code(resp or ""))
                       for r in _list(d.get("recipients"))[:_MAX_RECIPIENTS]])
    return None


# --- the whole message --------------------------------------------------------------------------

def _original_id(parts: _Parts, rest: str) -> str | None:
    for orig in parts.originals:
        if isinstance(orig, email.message.Message):
            mid = _header(orig, "Message-ID").strip()
            if mid:
                return _message_id_in(f"Message-ID: {mid}") or mid
            payload = orig.get_payload()
            if isinstance(payload, str):
                found = _message_id_in(payload)
                if found:
                    return found
        else:
            found = _message_id_in(orig)
            if found:
                return found
    return _message_id_in(rest) if rest else None


def _own_addresses(msg: email.message.Message) -> set[str]:
    """Addresses of the bounce's own envelope and headers: our sender, not the failed recipient."""
    out = set()
    for name in ("To", "Delivered-To", "Return-Path", "From", "Reply-To", "Sender", "Errors-To"):
        for value in _headers(msg, name):
            for m in _ADDR.finditer(value):
                out.add(_norm_addr(m.group(1), m.group(2)).lower())
    return out


def _from_daemon(msg: email.message.Message) -> bool:
    sender = _header(msg, "From")
    addr = _ADDR.search(sender)
    if addr and _DAEMON.match(addr.group(1)):
        return True
    return bool(_DAEMON_NAME.search(sender))


def _auto_reply(msg: email.message.Message) -> bool:
    auto = _header(msg, "Auto-Submitted").strip().lower()
    if auto.startswith("auto-replied"):
        return True
    if _header(msg, "X-Autoreply") or _header(msg, "X-Autorespond") or \
            _header(msg, "X-Autogenerated").lower().startswith("reply"):
        return True
    if _header(msg, "X-Vacation") or _header(msg, "X-Auto-Reply"):
        return True
    return bool(_AUTO_SUBJECT.search(_header(msg, "Subject")))


def parse(message: bytes, *, bounce_domain: str | None = None, verp_prefix: str = "bounces") -> Report:
    """Read one message received at the bounce address.

    Args:
      message: the raw message, any line endings.
      bounce_domain: the domain of our VERP return paths; when given, ``verp_id`` is read from
        the headers that carry the report's envelope recipient (Delivered-To, X-Original-To,
        To ...), else from anywhere in the message (the returned copy's Return-Path).
      verp_prefix: the local part before "+" in those return paths.

    Returns:
      a Report; ``kind="unknown"`` with no recipients when the message is none of the above. A
      bounce or a complaint always has at least one recipient, ``recipient=None`` when no
      address could be found (VERP still names the message).
    """
    data = bytes(message)
    try:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
    except RecursionError:
        # MIME nested deeper than the stdlib parser recurses (message/rfc822 inside
        # message/rfc822 ... a thousand times): keep the headers, read the body as text
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    report = _read_message(msg, 0)
    in_reply_to = _message_id_in(f"Message-ID: {_header(msg, 'In-Reply-To')}")
    if report.kind == "auto_reply" and in_reply_to:
        report.original_message_id = in_reply_to      # RFC 3834 section 3.1.5
    elif report.original_message_id is None and report.kind != "unknown":
        # a copy of the original that the MIME structure lost (a broken boundary), else the
        # reply's own reference
        blank = re.search(rb"\r?\n\r?\n", data)
        body = data[blank.end():] if blank else b""
        report.original_message_id = _message_id_in(body[:_MAX_TEXT].decode("latin-1")) or in_reply_to
    if bounce_domain:
        report.verp_id = _find_verp(msg, data, bounce_domain, verp_prefix)
    return report


def _find_verp(msg: email.message.Message, data: bytes, domain: str, prefix: str) -> str | None:
    """The VERP ID: from where the report was delivered (its envelope recipient), else from
    anywhere in it (the returned copy's Return-Path, Postfix's X-Postfix-Sender ...)."""
    for name in ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To",
                 "Return-Path"):
        for value in _headers(msg, name):
            for m in _ADDR.finditer(value):
                ident = verp_id(m.group(0), domain, prefix)
                if ident:
                    return ident
    anywhere = re.compile(rf"(?i)(?<![\w.+-]){re.escape(prefix)}\+([0-9A-Za-z]+)@{re.escape(domain)}"
                          rf"(?![\w-]|\.[\w-])")
    m = anywhere.search(data[: _MAX_TEXT * 4].decode("latin-1"))
    return m.group(1) if m else None


def _read_message(msg: email.message.Message, depth: int) -> Report:
    parts = _Parts()
    parts.walk(msg)
    report = _classify_message(msg, parts)
    if report.kind in ("bounce", "unknown") and not any(r.recipient for r in report.recipients) \
            and depth < 3:
        # a bounce forwarded inside another (a relay or a gateway wrapped it): read the inner one
        for orig in parts.originals:
            if isinstance(orig, email.message.Message) and (
                    _content_type(orig) == "multipart/report" or _from_daemon(orig)):
                inner = _read_message(orig, depth + 1)
                if inner.kind != "unknown" and inner.recipients:
                    return inner
    if report.kind == "bounce" and not report.recipients:
        # a bounce that names nobody still says that the message failed (VERP tells for whom)
        category, permanent, status = _classified("failed", None, None, None)
        report.recipients.append(RecipientReport(None, "failed", status, None, category, permanent))
    return report


def _classify_message(msg: email.message.Message, parts: _Parts) -> Report:
    full = parts.text()
    text = _short_lines(full)
    notice, rest = _split_original(text)

    # RFC 5965 ARF
    if parts.feedback or parts.report_type == "feedback-report":
        return _arf(parts, rest)

    # Amazon SES notifications by email
    if '"notificationType"' in full or '"eventType"' in full:
        obj = _ses_json(full)
        if obj is not None:
            r = _ses_report(obj)
            if r is not None:
                return r

    # RFC 3464, also when the fields sit in a text part (a broken boundary, or no MIME at all)
    status_text = "\n\n".join(parts.status)[:_MAX_TEXT] or _embedded_dsn(text)
    dsn = _read_dsn(status_text) if status_text else _Dsn()
    if dsn.records:
        if not parts.status and _dsn_start(notice) >= 0:
            notice = notice[: _dsn_start(notice)]
        return _dsn_report(msg, parts, dsn, notice, rest)

    # free-text bounces
    failed_hdr: list[str] = []
    for value in _headers(msg, "X-Failed-Recipients"):
        failed_hdr += [_norm_addr(m.group(1), m.group(2)) for m in _ADDR.finditer(value)]
    subject = _header(msg, "Subject")
    daemon = _from_daemon(msg)
    body_says = bool(_BOUNCE_BODY.search(notice))
    looks_bounce = bool(failed_hdr) or daemon or body_says or \
        parts.report_type == "delivery-status" or bool(_BOUNCE_SUBJECT.search(subject))
    auto = _auto_reply(msg)
    if looks_bounce and (not auto or daemon or failed_hdr or body_says):
        pairs = _free_text(notice, _own_addresses(msg), failed_hdr)
        delayed = bool(_DELAY.search(subject))
        recipients = []
        for addr, diag in pairs:
            status = _status_of(diag)
            code = _reply_code(diag or "")
            action = "delayed" if delayed else "failed"
            cat, perm, status = _classified(action, status, diag, code)
            recipients.append(RecipientReport(addr, action, status, diag, cat, perm,
                                              reply_code=code))
        return Report("bounce", _original_id(parts, rest), recipients)

    if auto:
        return _auto_report(msg, parts, notice, rest)
    return Report("unknown", _original_id(parts, rest), [])


def _dsn_start(text: str) -> int:
    m = re.search(r"(?im)^(reporting-mta|final-recipient|original-recipient)[ \t]*:", text)
    return m.start() if m else -1


def _dsn_report(msg: email.message.Message, parts: _Parts, dsn: _Dsn, notice: str, rest: str) -> Report:
    """One recipient per DSN record; a record without a usable Diagnostic-Code takes the text
    next to its address in the notice."""
    pairs = None
    recipients = []
    for rec in dsn.records[:_MAX_RECIPIENTS]:
        final = _addr_field(rec.get("final-recipient")) or _addr_field(rec.get("x-actual-recipient"))
        original = _addr_field(rec.get("original-recipient"))
        addr = final or original
        status_field = rec.get("status") or ""
        dsn_status = _status_of(status_field)
        action = _action(rec.get("action"), dsn_status)
        diag = _strip_diag_type(rec.get("diagnostic-code") or "") or None
        if not diag:
            comment = re.search(r"\((.+)\)", status_field)
            if comment and not re.fullmatch(r"(?i)(permanent|temporary|persistent|transient)"
                                            r"[ \w]*(failure|error)?", comment.group(1).strip()):
                diag = comment.group(1).strip()
        if not diag or not _usable(diag) or not addr:
            if pairs is None:
                pairs = _free_text(notice, _own_addresses(msg), [])
            found = next((d for a, d in pairs if a and addr and a.lower() == addr.lower()), None)
            if found is None and len(dsn.records) == 1 and len(pairs) == 1:
                # one recipient each side: the same one, even if the DSN names a file or a pipe
                found = pairs[0][1]
                addr = addr or pairs[0][0]
            if not diag or not _usable(diag):
                diag = found or diag
        if diag:
            diag = _focus(diag[:_MAX_DIAG * 2])[:_MAX_DIAG]
        code = _reply_code(diag or "")
        status = _choose_status(dsn_status, diag)
        remote = _strip_diag_type(rec.get("remote-mta") or "") or None
        if action in ("delivered", "relayed", "expanded"):
            recipients.append(RecipientReport(addr, action, status, diag, "delivery_report", False,
                                              remote, code, original if original != addr else None))
            continue
        cat, perm, status = _classified(action, status, diag, code)
        recipients.append(RecipientReport(addr, action, status, diag, cat, perm, remote, code,
                                          original if original != addr else None))
    kind: Kind = "bounce"
    if recipients and all(r.action in ("delivered", "relayed", "expanded") for r in recipients):
        kind = "delivery_report"
    return Report(kind, _original_id(parts, rest), recipients,
                  original_envelope_id=dsn.envelope_id)


def _arf(parts: _Parts, rest: str) -> Report:
    """An RFC 5965 feedback report; the recipient is Original-Rcpt-To, else the only address in
    the To of the returned message, unless the report says it redacted the address."""
    fields: dict[str, list[str]] = {}
    for block in _field_blocks("\n\n".join(parts.feedback)):
        for name, value in block:
            fields.setdefault(name, []).append(value)
    ftype = (fields.get("feedback-type") or [None])[0]
    ftype = ftype.strip().lower() if ftype else None
    addrs = []
    for value in fields.get("original-rcpt-to", []) + fields.get("removal-recipient", []):
        a = _first_addr(value)
        if a and a not in addrs:
            addrs.append(a)
    redacted = bool(fields.get("redacted-address"))
    if not addrs and not redacted:
        for orig in parts.originals[:1]:
            if isinstance(orig, email.message.Message):
                to = _header(orig, "To")
            else:
                m = re.search(r"(?im)^to:[ \t]*(.*)$", orig)
                to = m.group(1) if m else ""
            found = [_norm_addr(m.group(1), m.group(2)) for m in _ADDR.finditer(to)]
            if len(found) == 1:
                addrs = found
    recipients = [RecipientReport(a, None, None, None, "complaint", False) for a in addrs or [None]]
    return Report("complaint", _original_id(parts, rest), recipients, feedback_type=ftype)


def _auto_report(msg: email.message.Message, parts: _Parts, notice: str, rest: str) -> Report:
    """An RFC 3834 auto-reply from the recipient (its From). One that says the mailbox is gone
    keeps its kind but takes that category, so a caller may act on it."""
    who = _first_addr(_header(msg, "From"))
    diag = _squash(notice)[:_MAX_DIAG] or None
    category, permanent = "auto_reply", False
    if diag:
        # "this mailbox is no longer in use": an auto-reply that is really a bounce
        c = classify(0, diag, None)
        if c.category in ("inactive_mailbox", "invalid_recipient"):
            category, permanent = c.category, False
    return Report("auto_reply", _original_id(parts, rest),
                  [RecipientReport(who, None, None, diag, category, permanent)])
