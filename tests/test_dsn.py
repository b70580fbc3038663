"""Asynchronous bounces and complaints: RFC 3464, ARF, auto-replies and free-text formats.

Three groups: our own small fixtures (tests/data/dsn), real bounces from the shared corpus
(skipped, with the reason shown, when the corpus is not there), and property tests that no
input makes ``parse`` raise.
"""

from __future__ import annotations

import os
import pathlib

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sender import dsn

DATA = pathlib.Path(__file__).parent / "data" / "dsn"
ROOT = pathlib.Path(__file__).resolve().parent.parent


# The corpus, found the way bench/classify_eval.py finds it: $SENDER_CORPUS, else ../shared/corpus.
CORPUS_BASE = pathlib.Path(os.environ.get("SENDER_CORPUS") or ROOT.parent / "shared" / "corpus")
CORPUS = next((c for c in (CORPUS_BASE / "dsn", CORPUS_BASE) if (c / "labels.jsonl").is_file()), None)


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def sample(name: str) -> bytes:
    if CORPUS is None:
        pytest.skip(f"corpus not found at {CORPUS_BASE} (set SENDER_CORPUS)")
    return (CORPUS / name).read_bytes()


# --- our fixtures ---------------------------------------------------------------------------------

def test_rfc3464_one_failed_one_delayed():
    r = dsn.parse(fixture("rfc3464-two-recipients.eml"))
    assert r.kind == "bounce"
    assert r.original_message_id == "<offers-2025-03.Q7Kx2@sender.test>"
    assert r.original_envelope_id == "Q7Kx2"
    failed, delayed = r.recipients
    assert failed.recipient == "gone@shop.example"          # domain lower-cased
    assert (failed.action, failed.status, failed.reply_code) == ("failed", "5.1.1", 550)
    assert failed.diagnostic == "550 5.1.1 <gone@shop.example>: Recipient address rejected: User unknown"
    assert failed.remote_mta == "mx.shop.example"
    assert failed.category == "invalid_recipient" and failed.permanent
    assert delayed.recipient == "slow@far.example"
    assert (delayed.action, delayed.status) == ("delayed", "4.4.1")
    assert delayed.diagnostic.startswith("connect to mx.far.example")   # "X-Postfix;" stripped
    assert not delayed.permanent


def test_a_delayed_recipient_is_never_permanent_whatever_its_text_says():
    msg = (b"From: MAILER-DAEMON@mx.test\nContent-Type: multipart/report; report-type=delivery-status;"
           b" boundary=b\n\n--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.test\n\n"
           b"Final-Recipient: rfc822; a@x.example\nAction: delayed\nStatus: 4.0.0\n"
           b"Diagnostic-Code: smtp; 550 5.1.1 user unknown\n\n--b--\n")
    (rcpt,) = dsn.parse(msg).recipients
    assert rcpt.action == "delayed" and rcpt.category == "invalid_recipient" and not rcpt.permanent


def test_arf_complaint():
    r = dsn.parse(fixture("arf-complaint.eml"))
    assert (r.kind, r.feedback_type) == ("complaint", "abuse")
    assert r.original_message_id == "<offers-2025-03.R2d2@sender.test>"
    (rcpt,) = r.recipients
    assert (rcpt.recipient, rcpt.category, rcpt.permanent) == ("Reader@isp.example", "complaint", False)


def test_lf_only_free_text_bounce_reads_like_its_crlf_twin():
    lf = fixture("lf-only-bounce.eml")
    assert b"\r" not in lf
    r = dsn.parse(lf)
    assert r.kind == "bounce"
    assert r.original_message_id == "<offers-2025-03.Zq81@sender.test>"
    (rcpt,) = r.recipients
    assert (rcpt.recipient, rcpt.status, rcpt.reply_code) == ("full@box.example", "5.2.2", 552)
    assert rcpt.diagnostic == "552 5.2.2 <full@box.example>: Mailbox full"
    assert rcpt.category == "mailbox_full"
    assert dsn.parse(lf.replace(b"\n", b"\r\n")) == r


def test_verp_round_trip():
    addr = dsn.verp_address("Q7Kx2", "Bounce.Sender.Test")
    assert addr == "bounces+Q7Kx2@bounce.sender.test"
    assert dsn.verp_id(addr, "bounce.sender.test") == "Q7Kx2"
    assert dsn.verp_id(f"<{addr.upper()}>", "bounce.sender.test") == "Q7KX2"   # the ID keeps its case
    assert dsn.verp_id("bounces+Q7Kx2@other.test", "bounce.sender.test") is None
    assert dsn.verp_id("news+Q7Kx2@bounce.sender.test", "bounce.sender.test") is None
    assert dsn.verp_id("bounces+Q7-Kx2@bounce.sender.test", "bounce.sender.test") is None
    assert dsn.verp_id("bounces@bounce.sender.test", "bounce.sender.test") is None
    assert dsn.verp_id(dsn.verp_address("a1", "d.test", prefix="rt"), "d.test", prefix="rt") == "a1"
    with pytest.raises(ValueError, match="VERP id"):
        dsn.verp_address("not/ok", "bounce.sender.test")


def test_parse_reads_the_verp_id_when_it_knows_the_domain():
    data = fixture("rfc3464-two-recipients.eml")
    assert dsn.parse(data).verp_id is None
    assert dsn.parse(data, bounce_domain="bounce.sender.test").verp_id == "Q7Kx2"
    assert dsn.parse(fixture("lf-only-bounce.eml"), bounce_domain="bounce.sender.test").verp_id == "Zq81"
    assert dsn.parse(data, bounce_domain="elsewhere.test").verp_id is None
    # not in the envelope headers: found in the returned copy (its Return-Path)
    assert dsn.parse(fixture("arf-complaint.eml"), bounce_domain="bounce.sender.test").verp_id == "R2d2"


def test_to_json_shape():
    bounce = dsn.to_json("b.eml", dsn.parse(fixture("rfc3464-two-recipients.eml")))
    assert list(bounce) == ["file", "kind", "original_message_id", "recipients"]
    assert bounce["file"] == "b.eml" and bounce["kind"] == "bounce"
    assert [list(r) for r in bounce["recipients"]] == \
        [["recipient", "action", "status", "diagnostic", "category", "permanent"]] * 2
    assert bounce["recipients"][0]["permanent"] is True
    complaint = dsn.to_json("c.eml", dsn.parse(fixture("arf-complaint.eml")))
    assert list(complaint) == ["file", "kind", "original_message_id", "recipients", "feedback_type"]
    assert complaint["feedback_type"] == "abuse"
    orjson.dumps([bounce, complaint])          # plain JSON types only


def test_unknown_messages():
    plain = b"From: friend@x.test\nTo: me@y.test\nSubject: lunch?\n\nSee you at noon.\n"
    assert dsn.parse(plain) == dsn.Report("unknown", None, [])
    assert dsn.parse(b"").kind == "unknown"


# --- real bounces (the shared corpus) -----------------------------------------------------------

# file, kind, [(recipient, action, status)], original Message-ID
CASES = [
    ("lhost-postfix-13.eml", "bounce",            # RFC 3464 from Postfix, two recipients
     [("kijitora@example.jp", "failed", "5.2.1"), ("noraneko@example.jp", "failed", "5.2.2")],
     "<20150213024748.CEEDB20C16@2jo.example.jp>"),
    ("lhost-exim-01.eml", "bounce",               # Exim, no DSN: X-Failed-Recipients and text
     [("kijitora@example.ed.jp", "failed", "5.7.0")], "<E1P1ce6-000Egt-GZ@e1.example.org>"),
    ("lhost-qmail-17.eml", "bounce",              # qmail: "<addr>:" then "Remote host said:"
     [("userunknown@libsisimai.net", "failed", "5.1.1"), ("mailboxfull@libsisimai.net", "failed", "5.2.2")],
     "<20240624090401.44656.qmail@nq.example.jp>"),
    ("lhost-sendmail-01.eml", "bounce",
     [("userunknown@bouncehammer.jp", "failed", "5.1.1")], "<E1C50F1B-1C83-4820-BC36-AC6FBFBE8568@example.org>"),
    ("lhost-v5sendmail-05.eml", "bounce",         # Sendmail v5: only a transcript
     [("kijitora@example.edu", "failed", None), ("kuroneko@example.or.jp", "failed", None),
      ("kijitora@example.org", "failed", None), ("mikeneko@example.co.jp", "failed", None)], None),
    ("lhost-gmail-01.eml", "bounce",
     [("userunknown@example.jp", "failed", "5.1.1")], "<D992C2C3-F175-4C4D-97E2-53A90E4E5BF5@gmail.com>"),
    ("lhost-office365-01.eml", "bounce",          # "Remote Server returned '550 5.1.10 ...'"
     [("kijitora@example.com", "failed", "5.1.10")], "<FFFFFFFF.EEEEEEEE@example.ed.jp>"),
    ("lhost-exchange2003-01.eml", "bounce",
     [("kijitora@example.jp", "failed", None)], None),
    ("lhost-yahoo-01.eml", "bounce",
     [("kijitora@example.org", "failed", "5.1.1")], "<6AE6249A-E7A8-4980-862C-F499F6B8E7C5@y.example.co.jp>"),
    ("rhost-google-02.eml", "bounce",             # boundary in the header differs from the body's
     [("neko-nyaan@example.org", "failed", "5.1.1")], "<2018042233445.A95F8E533589@mail.example.co.jp>"),
    ("lhost-x5-01.eml", "bounce",                 # a bounce forwarded inside another message
     [("kijitora@neko.example.org", "failed", "5.1.1")],
     "<2222222222.0000000000002.JavaMail.nekogate@cat.example.jp>"),
    ("arf-02.eml", "complaint",
     [("this-local-part-does-not-exist-on-yahoo@yahoo.com", None, None)],
     "<000000000000000000000000.smtp@example.com>"),
    ("lhost-amazonses-11.eml", "complaint",       # Amazon SES complaint, JSON in the body
     [("complaint@simulator.amazonses.com", None, None)], None),
    ("rfc3834-02.eml", "auto_reply", [("nekonyaan@example.org", None, None)], None),
    ("rfc3464-28.eml", "delivery_report",
     [("kijitora@neko.example.jp", "delivered", "2.1.5")],
     "<20151025071802.22CC00222233@neko-222-2222.vs.example.ne.jp>"),
]


@pytest.mark.parametrize("name,kind,rcpts,message_id", CASES, ids=[c[0] for c in CASES])
def test_corpus_samples(name, kind, rcpts, message_id):
    r = dsn.parse(sample(name))
    assert r.kind == kind
    assert [(x.recipient, x.action, x.status) for x in r.recipients] == rcpts
    assert r.original_message_id == message_id
    if kind == "bounce":
        assert all(x.diagnostic for x in r.recipients)
    else:
        assert all(x.category == kind and not x.permanent for x in r.recipients)


def test_corpus_categories_of_the_plain_cases():
    """Texts whose category no classifier should doubt."""
    unknown = dsn.parse(sample("lhost-postfix-13.eml")).recipients[0]
    full = dsn.parse(sample("lhost-qmail-17.eml")).recipients[1]
    assert (unknown.category, unknown.permanent) == ("invalid_recipient", True)
    assert (full.category, full.permanent) == ("mailbox_full", True)
    assert dsn.parse(sample("arf-02.eml")).feedback_type == "abuse"


def test_every_corpus_file_parses():
    if CORPUS is None:
        sample("")      # skips with the reason
    kinds = {}
    for path in sorted(CORPUS.glob("*.eml")):
        r = dsn.parse(path.read_bytes())
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
        assert r.kind != "bounce" or r.recipients, path.name
    assert kinds["bounce"] > 350 and kinds["complaint"] == 5 and kinds["delivery_report"] == 2


# --- no input makes parse raise --------------------------------------------------------------------

def _seeds() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(DATA.glob("*.eml"))]
    if CORPUS is not None:
        names = [c[0] for c in CASES] + ["lhost-amazonses-12.eml", "lhost-domino-02.eml", "rfc3464-35.eml"]
        seeds += [(CORPUS / n).read_bytes() for n in names]
    return seeds


SEEDS = _seeds()

_SNIPPETS = [b"\r\n", b"\n\n", b"--", b"=?utf-8?q?=FF=FE?=", b"charset=\"x-no-such\"", b"charset=utf-7",
             b"Content-Transfer-Encoding: base64\n", b"Content-Type: message/rfc822\n\n",
             b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"\"\n\n",
             b"Final-Recipient: rfc822;\n", b"Action: \n", b"\xff\xfe\x00", b"{\"notificationType\":[",
             b"Remote Server returned '", b"<a@b.example>:\n", b"<<< 550 ", b"host x [", b"\t", b"@"]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, len(data)))
        if op == 0:
            data = data[:i]                                       # truncated
        elif op == 1 and i < len(data):
            data[i] = draw(st.integers(0, 255))                   # a flipped byte
        elif op == 2:
            data[i:i] = draw(st.sampled_from(_SNIPPETS))          # a hostile fragment
        else:
            j = draw(st.integers(i, min(len(data), i + 400)))
            del data[i:j]                                         # a hole
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_parse_never_raises_on_arbitrary_bytes(data):
    r = dsn.parse(data)
    orjson.dumps(dsn.to_json("x", r))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_parse_never_raises_on_mutated_samples(data):
    r = dsn.parse(data)
    assert r.kind in ("bounce", "complaint", "auto_reply", "delivery_report", "unknown")
    orjson.dumps(dsn.to_json("x", r))


def test_parse_survives_hostile_shapes():
    deep = b"Content-Type: message/rfc822\n\n" * 3000 + b"From: MAILER-DAEMON@x.test\n\nhi"
    wide = b"From: MAILER-DAEMON@x.test\n\n" + b" ".join(b"u%d@example.com" % i for i in range(20000))
    nested_json = b"From: x@y.test\n\n{\"notificationType\":" + b"[" * 50000
    for data in (deep, wide, nested_json):
        dsn.parse(data)
    assert len(dsn.parse(wide).recipients) <= 500


def test_ses_notifications_take_json_of_any_shape():
    def ses(body: str) -> dsn.Report:
        return dsn.parse(b"From: no-reply@sns.amazonaws.com\nSubject: Amazon SES\n\n" + body.encode())

    r = ses('{"notificationType":"Bounce","mail":{"headers":5},"bounce":{"bounceType":"Permanent",'
            '"bouncedRecipients":[{"emailAddress":"a@x.example","status":"5.1.1","action":"failed",'
            '"diagnosticCode":"smtp; 550 5.1.1 user unknown"}, 7]}}')
    assert r.kind == "bounce"
    assert [(x.recipient, x.status, x.diagnostic) for x in r.recipients] == \
        [("a@x.example", "5.1.1", "550 5.1.1 user unknown")]
    odd = ses('{"notificationType":"Bounce","bounce":{"bouncedRecipients":"nobody"}}')
    assert odd.kind == "bounce" and [x.recipient for x in odd.recipients] == [None]
    assert ses('{"notificationType":"Complaint","complaint":[]}').kind == "complaint"
    assert ses('{"notificationType":"Delivery","delivery":{"recipients":"abc"}}').kind == "delivery_report"
