"""``sender.mime``: Resend payloads become standards-compliant bytes, or a MimeError naming the field."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest
from hypothesis import assume, given, settings, strategies as st

from email import message_from_bytes

from sender import mime
from sender.errors import UsageError
from sender.mime import Built, MimeError, build_message, parse_address

DOMAIN = "mail.example.com"


def base(**changes) -> dict:
    payload = {"from": "Shop <shop@example.com>", "to": "ann@example.org",
               "subject": "Hello", "text": "Hi Ann"}
    for key, value in changes.items():
        if value is _DROP:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


_DROP = object()


def build(payload: dict, **kw) -> Built:
    return build_message(payload, message_id_domain=DOMAIN, now=1_700_000_000, **kw)


def parsed(built: Built) -> email.message.EmailMessage:
    return email.message_from_bytes(built.message, policy=email.policy.default)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD = [
    # (payload changes, field named)
    ({"from": _DROP}, "from"),
    ({"from": "not an address"}, "from"),
    ({"from": "Evil\r\nBcc: x@y.com <shop@example.com>"}, "from"),
    ({"from": ["shop@example.com"]}, "from"),
    ({"to": _DROP}, "to"),
    ({"to": []}, "to"),
    ({"to": 5}, "to"),
    ({"to": ["a@example.com", "b@@example.com"]}, "to[1]"),
    ({"to": ["a@example.com", "a b@example.com"]}, "to[1]"),
    ({"to": ["a@example.com", None]}, "to[1]"),
    ({"to": [f"u{i}@example.com" for i in range(51)]}, "to"),
    ({"to": "a..b@example.com"}, "to"),
    ({"to": "x" * 65 + "@example.com"}, "to"),
    ({"to": "a@" + "x" * 64 + ".com"}, "to"),
    ({"to": "a@-bad.com"}, "to"),
    ({"to": "a@localhost"}, "to"),
    ({"to": "a@exa mple.com"}, "to"),
    ({"to": "a@example.com\n"}, "to"),
    ({"to": "a\x00@example.com"}, "to"),
    ({"cc": ["ok@example.com", "bad"]}, "cc[1]"),
    ({"cc": {"a": 1}}, "cc"),
    ({"bcc": "bad@"}, "bcc"),
    ({"reply_to": ["@example.com"]}, "reply_to[0]"),
    ({"subject": _DROP}, "subject"),
    ({"subject": 3}, "subject"),
    ({"subject": "Hi\r\nBcc: victim@example.com"}, "subject"),
    ({"subject": "Hi\nthere"}, "subject"),
    ({"subject": "bell\x07"}, "subject"),
    ({"subject": "bad \ud800 surrogate"}, "subject"),
    ({"text": _DROP}, "text"),
    ({"text": ["x"]}, "text"),
    ({"html": 1.5}, "html"),
    ({"headers": ["X-A: b"]}, "headers"),
    ({"headers": {"X-A": "b\r\nBcc: victim@example.com"}}, "headers.X-A"),
    ({"headers": {"X-A\r\nBcc": "b"}}, "headers.X-A\r\nBcc"),
    ({"headers": {"X A": "b"}}, "headers.X A"),
    ({"headers": {"X:A": "b"}}, "headers.X:A"),
    ({"headers": {"X-Ü": "b"}}, "headers.X-Ü"),
    ({"headers": {"X-A": 1}}, "headers.X-A"),
    ({"headers": {"Subject": "other"}}, "headers.Subject"),
    ({"headers": {"bcc": "x@example.com"}}, "headers.bcc"),
    ({"headers": {"Content-Type": "text/html"}}, "headers.Content-Type"),
    ({"headers": {"Message-ID": "<a@b>"}}, "headers.Message-ID"),
    ({"attachments": {"filename": "a"}}, "attachments"),
    ({"attachments": ["a"]}, "attachments[0]"),
    ({"attachments": [{"filename": "a.txt", "content": "!!notbase64"}]}, "attachments[0].content"),
    ({"attachments": [{"filename": "a.txt", "content": "abc"}]}, "attachments[0].content"),
    ({"attachments": [{"filename": "a.txt"}]}, "attachments[0].content"),
    ({"attachments": [{"filename": "a.txt", "content": [1, 2]}]}, "attachments[0].content"),
    ({"attachments": [{"content": "YQ=="}]}, "attachments[0].filename"),
    ({"attachments": [{"filename": "a\r\nX-Evil: 1.txt", "content": "YQ=="}]},
     "attachments[0].filename"),
    ({"attachments": [{"filename": "a.txt", "content": "YQ==", "content_type": "text"}]},
     "attachments[0].content_type"),
    ({"attachments": [{"filename": "a.txt", "content": "YQ==", "content_type": "text/plain\r\nX: y"}]},
     "attachments[0].content_type"),
    ({"attachments": [{"filename": "a.txt", "content": "YQ==", "path": "https://x/y"}]},
     "attachments[0].path"),
    ({"react": "<Email/>"}, "react"),
    ({"sender": "x@example.com"}, "sender"),
    ({"tags": "x"}, "tags"),
]


@pytest.mark.parametrize("changes, field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_malformed_field_is_named(changes, field):
    with pytest.raises(MimeError) as info:
        build(base(**changes))
    assert info.value.field == field
    assert field.split(".")[0].split("[")[0] in str(info.value)


def test_error_is_a_usage_error_and_value_error():
    with pytest.raises(UsageError):
        build(base(to="nope"))
    with pytest.raises(ValueError):
        build(base(to="nope"))


def test_injection_is_called_so():
    with pytest.raises(MimeError, match="header injection"):
        build(base(subject="a\r\nBcc: x@example.com"))


def test_non_object_payload():
    with pytest.raises(MimeError) as info:
        build_message([], message_id_domain=DOMAIN)  # type: ignore[arg-type]
    assert info.value.field == "payload"


def test_react_is_not_supported():
    with pytest.raises(MimeError, match="react is not supported"):
        build(base(react="x"))


def test_known_unused_fields_are_ignored():
    build(base(tags=[{"name": "kind", "value": "welcome"}], scheduled_at=None))


def test_oversize_message():
    with pytest.raises(MimeError, match=r"message is \d+ bytes, over the limit of 2000") as info:
        build(base(text="x " * 900), max_bytes=2000)
    assert info.value.field == "message"
    with pytest.raises(MimeError) as info:
        build(base(attachments=[{"filename": "a.bin", "content": b64(b"x" * 5000)}]), max_bytes=2000)
    assert info.value.field == "message"
    for field in ("text", "html"):                       # one part alone is too big: it is named
        with pytest.raises(MimeError) as info:
            build(base(**{field: "x" * 3000}), max_bytes=2000)
        assert info.value.field == field


@pytest.mark.parametrize("value, expected", [
    ("a@example.com", ("", "a@example.com")),
    ("Ann Lee <ann@Example.COM>", ("Ann Lee", "ann@example.com")),
    ('"Lee, Ann" <ann@example.com>', ("Lee, Ann", "ann@example.com")),
    ('"a b"@example.com', ("", '"a b"@example.com')),
    ("ann@bücher.de", ("", "ann@xn--bcher-kva.de")),
    ("ann@[192.0.2.1]", ("", "ann@[192.0.2.1]")),
    ("jörg@example.com", ("", "jörg@example.com")),
])
def test_parse_address(value, expected):
    assert parse_address(value, "to") == expected


def test_text_only_and_html_only():
    msg = parsed(build(base()))
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().rstrip("\r\n") == "Hi Ann"
    msg = parsed(build(base(text=_DROP, html="<p>Hi</p>")))
    assert msg.get_content_type() == "text/html"


def test_text_and_html_make_an_alternative_text_first():
    msg = parsed(build(base(html="<p>Hi Ann</p>")))
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_attachments_round_trip_byte_exact():
    blobs = [bytes(range(256)) * 40, b"", "ünïcode\n".encode()]
    payload = base(html="<b>x</b>", attachments=[
        {"filename": "data.bin", "content": b64(blobs[0])},
        {"filename": "empty.pdf", "content": b64(blobs[1])},
        {"filename": "naïve résumé.txt", "content": b64(blobs[2]), "content_type": "text/plain"},
    ])
    msg = parsed(build(payload))
    assert msg.get_content_type() == "multipart/mixed"
    body, *parts = list(msg.iter_parts())
    assert body.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parts] == [
        "application/octet-stream", "application/pdf", "text/plain"]
    assert [p.get_filename() for p in parts] == ["data.bin", "empty.pdf", "naïve résumé.txt"]
    assert all(p.get_content_disposition() == "attachment" for p in parts)
    assert all(p["Content-Transfer-Encoding"] == "base64" for p in parts)
    assert [p.get_payload(decode=True) for p in parts] == blobs
    assert b"filename*=utf-8''na%C3%AFve%20r%C3%A9sum%C3%A9.txt" in build(payload).message


def test_bcc_is_in_the_envelope_only_and_rcpts_are_deduplicated():
    built = build(base(to=["Ann <ann@example.org>", "bob@example.org"], cc="ANN@example.org",
                       bcc=["secret@example.net", "Bob@Example.org"]))
    assert built.rcpts == ["ann@example.org", "bob@example.org", "secret@example.net"]
    assert built.sender == "shop@example.com"
    msg = parsed(built)
    assert msg["Bcc"] is None
    assert b"secret@" not in built.message
    assert msg["Cc"] == "ANN@example.org"
    assert msg["To"] == "Ann <ann@example.org>, bob@example.org"


def test_headers_present():
    built = build(base(reply_to=["help@example.com", "Desk <desk@example.com>"],
                       headers={"X-Campaign": "spring", "List-Unsubscribe": "<https://u.example/x>"}))
    msg = parsed(built)
    assert msg["From"] == "Shop <shop@example.com>"
    assert msg["Reply-To"] == "help@example.com, Desk <desk@example.com>"
    assert msg["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert msg["Message-ID"] == f"<{built.message_id}>"
    assert built.message_id.endswith("@" + DOMAIN)
    assert msg["MIME-Version"] == "1.0"
    assert msg["X-Campaign"] == "spring"
    assert msg["List-Unsubscribe"] == "<https://u.example/x>"
    assert build(base()).message_id != build(base()).message_id


def test_non_ascii_subject_and_display_name_are_rfc2047_and_decode_back():
    subject = "Grüße aus Köln — 東京 " * 5
    built = build(base(subject=subject, **{"from": "Jörg Müller <jm@example.com>"}))
    assert built.message.isascii()
    assert b"=?utf-8?" in built.message
    msg = parsed(built)
    assert msg["Subject"] == subject
    assert msg["From"].addresses[0].display_name == "Jörg Müller"


def test_idna_domain_is_converted():
    built = build(base(to="Ann <ann@bücher.de>", cc="x@ÉXAMPLE.com"))
    assert built.rcpts == ["ann@xn--bcher-kva.de", "x@xn--xample-9ua.com"]
    assert parsed(built)["To"].addresses[0].domain == "xn--bcher-kva.de"
    assert not built.smtputf8


def test_non_ascii_local_part_sets_smtputf8():
    built = build(base(to="jörg@example.com"))
    assert built.smtputf8
    assert built.rcpts == ["jörg@example.com"]
    assert "jörg@example.com".encode() in built.message
    assert not build(base()).smtputf8


def assert_wire_clean(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_crlf_everywhere_and_short_lines():
    built = build(base(
        subject="s" * 3000, text="line\n" + "y" * 5000 + "\nünï\r\nend\rcr",
        html="<p>" + "z" * 5000 + "</p>", headers={"X-Long": "w" * 3000, "X-Words": "ab " * 1000},
        attachments=[{"filename": "f" * 300 + ".txt", "content": b64(b"q" * 10000)}]))
    assert_wire_clean(built.message)
    msg = parsed(built)
    assert msg["Subject"] == "s" * 3000
    assert msg["X-Long"] == "w" * 3000


NAMES = ["from", "to", "cc", "bcc", "reply_to", "subject", "html", "text", "headers",
         "attachments", "tags", "filename", "content", "content_type"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30)
    | st.sampled_from(["a@example.com", "Ann <a@bücher.de>", "YQ==", "jö@x.io", "x.txt"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_arbitrary_json_gives_built_or_mime_error(payload):
    try:
        built = build(payload)
    except MimeError:
        return
    assert_wire_clean(built.message)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries(
    {"from": st.sampled_from(["a@example.com", "Ann <a@example.com>"]),
     "to": st.text(max_size=40) | st.lists(st.text(max_size=20), max_size=3)},
    optional={"subject": st.text(), "text": st.text(), "html": st.text(),
              "headers": st.dictionaries(st.text(max_size=10), st.text(), max_size=3),
              "attachments": st.lists(st.fixed_dictionaries(
                  {"filename": st.text(max_size=20), "content": st.text(max_size=20)}), max_size=2)}))
def test_near_valid_payloads_give_built_or_mime_error(payload):
    try:
        built = build(payload)
    except MimeError:
        return
    assert_wire_clean(built.message)


# ---------------------------------------------------------------------- the two writers agree


def _read(raw: bytes) -> dict:
    msg = message_from_bytes(raw, policy=email.policy.default)
    out = {}
    for name in ("From", "To", "Cc", "Reply-To"):
        if msg[name] is not None:
            out[name] = [(a.display_name, a.addr_spec) for a in msg[name].addresses]
    out["Subject"] = str(msg["Subject"])
    out["custom"] = [(k, str(v)) for k, v in msg.items() if k.lower().startswith("x-")]
    out["parts"] = [(p.get_content_type(), p.get_content().replace("\r\n", "\n").rstrip("\n"))
                    for p in msg.walk() if not p.is_multipart()]
    return out


_words = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=40)


_body = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), whitelist_characters="\n"),
                max_size=300)


@settings(max_examples=300, deadline=None)
@given(display=_words, subject=st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
                                       max_size=200),
       text=st.one_of(st.none(), _body), html=st.one_of(st.none(), _body), header=_words, many=st.integers(1, 5))
def test_the_direct_writer_says_what_it_was_given(display, subject, text, html, header, many):
    """What a reader (the email package) gets back from the direct writer is the payload."""
    assume(all(mime._plain(v) for v in (display, subject, header)))
    assume(display.isascii() or len(display.encode()) <= mime._SHORT_NAME)   # else: the email package
    if text is None and html is None:
        text = ""
    payload = {"from": f"{_q(display)} <app@x.test>", "to": [f"{_q(display)} <u{i}@y.test>" for i in range(many)],
               "cc": ["c@y.test"], "subject": subject, "headers": {"X-Note": header}}
    for name, value in (("text", text), ("html", html)):
        if value is not None:
            payload[name] = value
    try:
        built = mime.build_message(payload, message_id_domain="s.test", now=0)
    except mime.MimeError:
        return
    got = _read(built.message)
    bodies = [("text/plain", text), ("text/html", html)]
    assert got == {"From": [(display, "app@x.test")], "To": [(display, f"u{i}@y.test") for i in range(many)],
                   "Cc": [("", "c@y.test")], "Subject": subject, "custom": [("X-Note", header)],
                   "parts": [(t, v.rstrip("\n")) for t, v in bodies if v is not None]}
    assert b"\n" not in built.message.replace(b"\r\n", b"")
    head = built.message[:built.message.find(b"\r\n\r\n")]
    assert all(len(line) <= 78 for line in head.split(b"\r\n")), head


def _q(display: str) -> str:
    return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_attachments_by_path_are_read_only_inside_the_folder(tmp_path):
    folder = tmp_path / "files"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "report.pdf").write_bytes(b"%PDF-1.4 data")
    (tmp_path / "secret.txt").write_text("no")
    (folder / "escape").symlink_to(tmp_path / "secret.txt")

    def payload(**attachment):
        return {"from": "a@x.test", "to": "b@y.test", "subject": "s", "text": "t", "attachments": [attachment]}

    built = build_message(payload(path="sub/report.pdf"), message_id_domain="s.test", attachment_folder=folder)
    parts = [p for p in message_from_bytes(built.message, policy=email.policy.default).iter_attachments()]
    assert [(p.get_filename(), p.get_content_type(), p.get_content()) for p in parts] == [
        ("report.pdf", "application/pdf", b"%PDF-1.4 data")]
    for path, problem in (("../secret.txt", "is outside the attachment folder"),
                          (str(tmp_path / "secret.txt"), "is outside the attachment folder"),
                          ("escape", "is outside the attachment folder"),
                          ("sub", "is not a file"),
                          ("nope.pdf", "cannot be read")):
        with pytest.raises(MimeError) as e:
            build_message(payload(path=path), message_id_domain="s.test", attachment_folder=folder)
        assert (e.value.field, e.value.problem.split(":")[0]) == ("attachments[0].path", problem), path
    with pytest.raises(MimeError) as e:                   # no folder configured: nothing is read
        build_message(payload(path="sub/report.pdf"), message_id_domain="s.test")
    assert e.value.field == "attachments[0].path" and "no attachment folder" in e.value.problem


@pytest.mark.parametrize("raw, expected", [
    (b"From: A <a@x.test>\r\nTo: b@y.test\r\nSubject: Hi\r\n\r\nbody", {"from": "A <a@x.test>", "to": "b@y.test",
                                                                      "subject": "Hi"}),
    (b"fROM: a@x.test\r\nX-To: no\r\nsubject: =?utf-8?q?caf=C3=A9?=\r\n\tfolded\r\n\r\n",
     {"from": "a@x.test", "subject": "caf\u00e9\tfolded"}),
    (b"Subject: first\r\nSubject: second\r\n\r\n", {"subject": "first"}),
    (b"Subject: no body", {"subject": "no body"}),
    (b"X: y\r\n\r\nSubject: in the body\r\n", {}),
    (b"", {}),
])
def test_summary_reads_from_to_and_subject(raw, expected):
    assert mime.summary(raw) == expected


@settings(max_examples=60, deadline=None)
@given(subject=st.text(min_size=1, max_size=120).filter(lambda s: s.strip() == s and "  " not in s),
       name=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=30))
def test_summary_agrees_with_the_stdlib_on_built_messages(subject, name):
    try:
        built = build(base(subject=subject, **{"from": f'"{name}" <shop@example.com>' if name else "shop@example.com"}))
    except MimeError:
        assume(False)
    mine = mime.summary(built.message)
    theirs = parsed(built)
    assert mine["subject"] == str(theirs["subject"])
    assert mine["from"].endswith("shop@example.com>") or mine["from"] == "shop@example.com"
