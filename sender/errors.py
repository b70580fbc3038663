"""Every exception sender raises, so callers can catch by blame and outcome.

::

    SendError
     ├─ ProtocolError                 never raised itself
     │   ├─ LocalProtocolError        we misused the protocol (RCPT before MAIL, CR in an address)
     │   └─ RemoteProtocolError       the peer broke it (garbage reply, EOF mid-reply)
     ├─ ReplyError(reply)             the server answered, and said no
     │   ├─ TransientReply            4xx: defer and retry
     │   └─ PermanentReply            5xx: bounce
     ├─ ConnectError                  no usable session (connect, greeting, EHLO, TLS)
     ├─ SessionError                  an open session broke or timed out: outcome unknown
     ├─ DNSError                      lookup failed; ``permanent`` says whether to retry
     └─ UsageError                    bad input to the public API

Foreign errors (OSError, ssl, trio, dnspython) are translated once, at the module that
touches them, so nothing above sees anything outside this tree.
"""

from __future__ import annotations

from .model import Reply

__all__ = [
    "SendError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ReplyError",
    "TransientReply",
    "PermanentReply",
    "ConnectError",
    "SessionError",
    "DNSError",
    "UsageError",
]


class SendError(Exception):
    """Base of every sender exception."""


class ProtocolError(SendError):
    """A protocol rule was broken; the subclass says by whom."""


class LocalProtocolError(ProtocolError):
    """Our side misused the protocol; nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the session cannot be trusted any more."""


class ReplyError(SendError):
    """A negative reply, carried as a value so callers can log and journal it."""

    def __init__(self, reply: Reply, /) -> None:
        super().__init__(str(reply))
        self.reply = reply

    def __reduce__(self):
        return (type(self), (self.reply,))

    @staticmethod
    def from_reply(reply: Reply) -> ReplyError:
        """The exception for ``reply``: 5xx is permanent, anything else is retried."""
        return PermanentReply(reply) if reply.code >= 500 else TransientReply(reply)


class TransientReply(ReplyError):
    """4xx: try again later."""


class PermanentReply(ReplyError):
    """5xx: give up on these recipients."""


class ConnectError(SendError):
    """No usable session could be opened.

    ``reply`` is the refusal when the server answered (greeting, EHLO); ``tls_failed`` marks
    a failed STARTTLS handshake so the caller can retry in clear text.
    """

    def __init__(self, message: str, *, reply: Reply | None = None, tls_failed: bool = False) -> None:
        super().__init__(message)
        self.reply = reply
        self.tls_failed = tls_failed


class SessionError(SendError):
    """An open session broke or timed out mid-transaction; the outcome is unknown.

    ``unfinished`` lists the items of a pipelined run whose outcome is unknown (None when
    the caller knows which transaction it was in).
    """

    def __init__(self, message: str, *, unfinished: list | None = None) -> None:
        super().__init__(message)
        self.unfinished = unfinished


class DNSError(SendError):
    """A lookup failed. Transient unless a subclass sets ``permanent``."""

    permanent: bool = False


class UsageError(SendError):
    """The public API was called with bad input; the message names the argument."""
