"""Non-delivery reports: the RFC 3464 message that tells a sender its mail failed.

Sent from the null sender (``MAIL FROM:<>``) so that nobody answers it, and never for mail
that had the null sender itself or that says it was automatic (``Auto-Submitted``, RFC 3834):
a report about a report would be the start of a loop. The original message's headers are
attached (``text/rfc822-headers``), not its body.
"""

from __future__ import annotations

import email.utils
import re
import time
import uuid

from .model import Reply

__all__ = ["build_report", "wants_report"]

_AUTO = re.compile(rb"(?im)^auto-submitted:[ \t]*(?!no\b)\S")
_PRECEDENCE = re.compile(rb"(?im)^precedence:[ \t]*(bulk|junk|list)\b")


def wants_report(sender: str, body: bytes) -> bool:
    """Whether a failure of this message may be reported to its sender."""
    if not sender or sender.lower().startswith("mailer-daemon@"):
        return False
    head = body[: body.find(b"\r\n\r\n") + 2] if b"\r\n\r\n" in body else body
    return not _AUTO.search(head) and not _PRECEDENCE.search(head)


def _headers_of(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body[: end + 2] if end >= 0 else body


def build_report(*, hostname: str, msg_id: str, sender: str, failed: list[tuple[str, Reply, str]],
                 original: bytes, arrival: float, now: float | None = None) -> bytes:
    """The report for ``failed`` recipients, each ``(address, reply, remote host)``; the reply
    of a message that expired is the last one it got."""
    now = time.time() if now is None else now
    boundary = f"{msg_id}.{uuid.uuid4().hex[:12]}/{hostname}"
    date = email.utils.formatdate(now)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{msg_id}.{int(now)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients. The reasons follow.",
        "",
    ]
    for rcpt, reply, remote in failed:
        at = f" (from {remote})" if remote else ""
        lines.append(f"<{rcpt}>: {reply}{at}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Sender-Queue-ID: {msg_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival)}",
    ]
    for rcpt, reply, remote in failed:
        status = reply.enhanced or ("5.0.0" if reply.code >= 500 else "4.0.0")
        if status.startswith("4."):      # expired: a temporary failure that became final
            status = "5" + status[1:]
        text = " ".join(reply.text.split())
        lines += ["", f"Final-Recipient: rfc822; {rcpt}", "Action: failed", f"Status: {status}"]
        if remote:
            lines.append(f"Remote-MTA: dns; {remote}")
        if reply.code:
            lines.append(f"Diagnostic-Code: smtp; {reply.code} {text}")
        lines.append(f"Last-Attempt-Date: {date}")
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", "Content-Description: Undelivered Message Headers", ""]
    out = ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
    return out + _headers_of(original) + f"\r\n--{boundary}--\r\n".encode()
