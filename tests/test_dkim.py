"""sender.dkim against dkimpy: its verifier must accept our signatures (looked up in a dict and
through a real DNS server on loopback), its canonicalization must agree with ours on random
messages, and tampering with what is signed must make it refuse."""

from __future__ import annotations

import base64
import hashlib
import random
import time
from types import SimpleNamespace

import dkim
import dkim.canonicalization
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sender._wire_py import dot_stuff
from sender.config import DkimConfig
from sender.dkim import (
    DEFAULT_HEADERS,
    OVERSIGN,
    DkimError,
    Key,
    Signer,
    _relaxed_body,
    _relaxed_header,
    _split,
    load_key,
)

from dnsserver import DNSServer

MESSAGE = (b"From: Joe Example <joe@example.test>\r\n"
           b"To: Ann <ann@receiver.test>,\r\n\tbob@receiver.test\r\n"
           b"Subject:  Quarterly   numbers \r\n"
           b"Date: Tue, 14 May 2024 10:00:00 +0000\r\n"
           b"Message-ID: <1234@example.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"X-Mailer: none of your business\r\n"
           b"\r\n"
           b"Hello Ann,  \r\n\r\nthe numbers\tare in.\r\n\r\n\r\n")


def received(message: bytes) -> bytes:
    """What the receiving server stores: the bytes our SMTP client sends, un-stuffed."""
    return dot_stuff(message)[:-3].replace(b"\r\n..", b"\r\n.")


def pem(key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def rsa_record(key: rsa.RSAPrivateKey) -> bytes:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def ed25519_record(key: ed25519.Ed25519PrivateKey) -> bytes:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key files and their TXT records: example.test has an RSA-2048 (PKCS#1 PEM) and an
    Ed25519 (PKCS#8 PEM) key, seed.test an Ed25519 key written as the base64 of its seed."""
    d = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    seed_key = ed25519.Ed25519PrivateKey.generate()
    (d / "rsa.pem").write_bytes(pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL))
    (d / "rsa8.pem").write_bytes(pem(rsa_key))
    (d / "ed.pem").write_bytes(pem(ed_key))
    seed = seed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())
    (d / "ed.seed").write_bytes(base64.b64encode(seed) + b"\n")
    records = {
        "rsa._domainkey.example.test": rsa_record(rsa_key),
        "ed._domainkey.example.test": ed25519_record(ed_key),
        "seed._domainkey.seed.test": ed25519_record(seed_key),
    }
    return SimpleNamespace(
        dir=d, records=records,
        rsa=load_key("example.test", "rsa", str(d / "rsa.pem")),
        ed=load_key("example.test", "ed", str(d / "ed.pem")),
        seed=load_key("seed.test", "seed", str(d / "ed.seed")),
    )


def dnsfunc_for(records: dict[str, bytes]):
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())
    return dnsfunc


def verify(message: bytes, keys, idx: int | None = None) -> bool:
    if idx is None:
        return dkim.verify(message, dnsfunc=dnsfunc_for(keys.records))
    return dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc_for(keys.records))


def tags(field: bytes) -> dict[str, str]:
    value = field.decode().partition(":")[2].replace("\r\n", "")
    return {k.strip(): v.strip() for k, _, v in (t.partition("=") for t in value.split(";") if t.strip())}


# ------------------------------------------------------------------ dkimpy verifies

def test_rsa_signature_verifies(keys):
    signed = Signer([keys.rsa]).sign(MESSAGE, time.time())
    assert verify(signed, keys)
    assert tags(signed)["a"] == "rsa-sha256"


@pytest.mark.parametrize("which", ["ed", "seed"])
def test_ed25519_signature_verifies(keys, which):
    key = getattr(keys, which)
    message = MESSAGE.replace(b"@example.test>\r\nTo", f"@{key.domain}>\r\nTo".encode())
    signed = Signer([key]).sign(message, time.time())
    assert tags(signed)["a"] == "ed25519-sha256" and tags(signed)["d"] == key.domain
    assert verify(signed, keys)


def test_a_domain_with_two_keys_signs_twice_and_each_verifies(keys):
    signer = Signer([keys.rsa, keys.ed, keys.seed])
    sigs = signer.signatures(MESSAGE, time.time())
    assert [tags(s)["s"] for s in sigs] == ["rsa", "ed"]            # config order
    signed = signer.sign(MESSAGE, time.time())
    assert signed == b"".join(sigs) + MESSAGE
    assert verify(signed, keys, idx=0) and verify(signed, keys, idx=1)
    assert not verify(signed, keys, idx=2)                         # there is no third


def test_message_with_bare_lf_is_not_rewritten_and_verifies(keys):
    message = MESSAGE.replace(b"\r\n", b"\n")
    signed = Signer([keys.ed]).sign(message, time.time())
    assert signed.endswith(message)
    assert verify(received(signed), keys)


def test_message_without_body_verifies(keys):
    message = b"From: joe@example.test\r\nSubject: only headers"
    signed = Signer([keys.rsa]).sign(message, time.time())
    assert tags(signed)["bh"] == base64.b64encode(hashlib.sha256(b"").digest()).decode()
    assert verify(received(signed), keys)


def test_idna_domain_is_signed_with_its_a_labels(keys):
    key = Key("xn--bcher-kva.test", "ed", keys.ed.algorithm, DEFAULT_HEADERS, keys.ed.private_key)
    message = "From: Jörg <jörg@BÜCHER.test>\r\nSubject: x\r\n\r\nhi\r\n".encode()
    signed = Signer([key]).sign(message, time.time())
    assert tags(signed)["d"] == "xn--bcher-kva.test"
    records = {"ed._domainkey.xn--bcher-kva.test": keys.records["ed._domainkey.example.test"]}
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(records))


def test_load_key_gives_the_idna_form_of_the_domain(keys):
    key = load_key("Bücher.TEST.", "s1", str(keys.dir / "ed.pem"))
    assert key.domain == "xn--bcher-kva.test"


# ------------------------------------------------------------------ real DNS

def txt(record: bytes) -> str:
    """A TXT record's presentation form, as 255-byte character strings."""
    return " ".join(f'"{record[i:i + 255].decode()}"' for i in range(0, len(record), 255))


def test_verifies_through_a_real_dns_server(keys):
    with DNSServer() as srv:
        for name, record in keys.records.items():
            srv.add(name, "TXT", txt(record))
        host, port = srv.address.rsplit(":", 1)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = int(port)

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
            return b"".join(b"".join(rdata.strings) for rdata in answer)

        assert len(keys.records["rsa._domainkey.example.test"]) > 255      # really split
        signed = Signer([keys.rsa, keys.ed]).sign(MESSAGE, time.time())
        assert dkim.DKIM(signed).verify(idx=0, dnsfunc=dnsfunc)
        assert dkim.DKIM(signed).verify(idx=1, dnsfunc=dnsfunc)
        assert srv.queries[("rsa._domainkey.example.test", "TXT")] >= 1
        assert srv.queries[("ed._domainkey.example.test", "TXT")] >= 1


# ------------------------------------------------------------------ random messages

_FOLDS = [" ", "  ", "\t", " \t ", "\r\n ", "\r\n\t", "\r\n \t"]
_word = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.sampled_from("éü€漢字😀"),
                min_size=1, max_size=8)
_encoded = _word.map(lambda w: "=?utf-8?b?" + base64.b64encode(w.encode()).decode() + "?=")
_safe_word = st.text(st.sampled_from("abcXYZ019.-_!#éü"), min_size=1, max_size=6)


@st.composite
def header_value(draw, words=_word | _encoded) -> bytes:
    parts = [draw(st.sampled_from(["", " ", "  ", "\t"]))]
    for i, word in enumerate(draw(st.lists(words, min_size=1, max_size=6))):
        if i:
            parts.append(draw(st.sampled_from(_FOLDS)))
        parts.append(word)
    parts.append(draw(st.sampled_from(["", " ", "\t ", "  "])))
    return "".join(parts).encode()


@st.composite
def message(draw) -> bytes:
    display = draw(header_value(_safe_word))
    address = draw(st.sampled_from([b"<joe@example.test>", b"<joe@EXAMPLE.test>", b"joe@example.test"]))
    from_value = display + b" " + address if address.startswith(b"<") else b" " + address
    names = draw(st.lists(st.sampled_from(["To", "Cc", "Subject", "Date", "Message-ID",
                                           "Reply-To", "Received", "X-Tag", "List-Unsubscribe"]),
                          max_size=8))
    fields = draw(st.permutations([(b"From", from_value)] + [(n.encode(), draw(header_value()))
                                                             for n in names]))
    head = b"".join(draw(st.sampled_from([n, n.lower(), n.upper()])) + b":" + v + b"\r\n"
                    for n, v in fields)
    if draw(st.booleans()) and draw(st.booleans()):
        return head.removesuffix(b"\r\n") if draw(st.booleans()) else head      # no body at all
    chunk = st.binary(min_size=1, max_size=6).map(
        lambda b: b.replace(b"\r", b"x").replace(b"\n", b"y").replace(b" ", b"z").replace(b"\t", b"w"))
    ws = st.sampled_from([b" ", b"  ", b"\t", b" \t", b"\t\t "])
    line = st.lists(chunk | ws, max_size=8).map(b"".join)
    ends = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r"])
    body = b"".join(draw(line) + draw(ends) for _ in range(draw(st.integers(0, 6))))
    body += b"\r\n" * draw(st.integers(0, 3))               # empty lines at the end
    body += draw(line) if draw(st.booleans()) else b""      # maybe no final CRLF
    return head + b"\r\n" + body


_RANDOM = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_RANDOM
@given(message())
def test_random_messages_verify(keys, message):
    signed = Signer([keys.ed]).sign(message, time.time())
    assert signed != message and signed.endswith(message)
    assert verify(received(signed), keys)


@_RANDOM
@given(message())
def test_canonicalization_agrees_with_dkimpy(message):
    relaxed = dkim.canonicalization.Relaxed
    their_headers, their_body = dkim.rfc822_parse(received(message))
    fields, body = _split(message)
    assert [_relaxed_header(n, v) for n, v in fields] == \
           [n + b":" + v for n, v in relaxed.canonicalize_headers(their_headers)]
    assert _relaxed_body(body) == relaxed.canonicalize_body(their_body)


def test_last_line_without_crlf_is_canonicalized_as_sent():
    # dot_stuff adds the CRLF, after which the trailing blanks are trailing whitespace.
    assert _relaxed_body(b"abc \t") == _relaxed_body(b"abc \t\r\n") == b"abc\r\n"
    assert _relaxed_body(b"  ") == _relaxed_body(b"\r\n\r\n") == b""


# ------------------------------------------------------------------ tampering

@pytest.mark.parametrize("tamper", [
    pytest.param(lambda m: m.replace(b"the numbers", b"the Numbers"), id="body"),
    pytest.param(lambda m: m.replace(b"Quarterly", b"Annual"), id="subject"),
    pytest.param(lambda m: b"From: ceo@example.test\r\n" + m, id="second-from"),
    pytest.param(lambda m: b"Subject: Urgent: wire money\r\n" + m, id="added-subject"),
    pytest.param(lambda m: b"Reply-To: thief@evil.test\r\n" + m, id="added-reply-to"),
])
@pytest.mark.parametrize("key", ["rsa", "ed"])
def test_tampering_breaks_the_signature(keys, tamper, key):
    signed = Signer([getattr(keys, key)]).sign(MESSAGE, time.time())
    assert verify(signed, keys)
    assert not verify(tamper(signed), keys)


def test_h_lists_each_header_per_instance_and_oversigned_once_more(keys):
    message = MESSAGE.replace(b"X-Mailer", b"Received: a\r\nReceived: b\r\nTo: c@receiver.test\r\nX-Mailer")
    h = tags(Signer([keys.ed]).signatures(message, time.time())[0])["h"].replace(" ", "").split(":")
    assert h.count("from") == 2 and h.count("to") == 3 and h.count("subject") == 2
    assert h.count("mime-version") == 1 and h.count("content-type") == 1      # not oversigned
    assert h.count("cc") == 1 and h.count("reply-to") == 1                    # absent: null only
    assert "received" not in h and "x-mailer" not in h and "references" not in h
    assert set(h) <= set(DEFAULT_HEADERS) and {"from", "subject"} <= OVERSIGN


def test_a_key_with_its_own_headers_signs_just_those(keys):
    key = load_key("example.test", "ed", str(keys.dir / "ed.pem"), ["From", "Subject", "X-Mailer"])
    assert key.headers == ("from", "subject", "x-mailer")
    signed = Signer([key]).sign(MESSAGE, time.time())
    assert tags(signed)["h"].replace(" ", "") == "from:from:subject:subject:x-mailer"
    assert verify(signed, keys)
    assert not verify(signed.replace(b"none of your", b"all of your"), keys)


# ------------------------------------------------------------------ which domain signs

def from_(value: bytes) -> bytes:
    return MESSAGE.replace(b"From: Joe Example <joe@example.test>", b"From: " + value)


def test_exact_domain_signs(keys):
    signer = Signer([keys.seed, keys.ed])
    assert signer.domain_for(MESSAGE) == "example.test"
    assert signer.domain_for(from_(b"x@seed.test")) == "seed.test"


def test_parent_domain_signs_a_subdomain(keys):
    signer = Signer([keys.ed])
    message = from_(b"News <news@mail.news.example.test>")
    assert signer.domain_for(message) == "example.test"
    signed = signer.sign(message, time.time())
    assert tags(signed)["d"] == "example.test"
    assert verify(signed, keys)


def test_nearest_parent_wins(keys):
    sub = Key("news.example.test", "sub", keys.ed.algorithm, DEFAULT_HEADERS, keys.ed.private_key)
    signer = Signer([keys.ed, sub])
    assert signer.domain_for(from_(b"a@mail.news.example.test")) == "news.example.test"
    assert signer.domain_for(from_(b"a@other.example.test")) == "example.test"


@pytest.mark.parametrize("value", [b"x@elsewhere.test", b"x@notexample.test", b"x@example.test.evil",
                                   b"undisclosed-recipients:;", b"<>"])
def test_no_key_leaves_the_message_alone(keys, value):
    signer = Signer([keys.rsa, keys.ed])
    message = from_(value)
    assert signer.sign(message, time.time()) is message
    assert signer.signatures(message, time.time()) == []
    assert signer.domain_for(message) is None


@pytest.mark.parametrize("value", [
    b'"Joe, Example" <joe@EXAMPLE.Test>',
    b"=?utf-8?q?J=C3=B6rg?= <JOE@example.TEST>",
    b'"a@evil.test <x@evil.test>" (comment <c@evil.test>) <joe@example.test>',
    b"joe@Example.Test",
    b"joe@example.test (Joe)",
    b" Joe\r\n <joe@example.test>",
])
def test_from_forms_and_case(keys, value):
    signer = Signer([keys.ed])
    message = from_(value)
    assert signer.domain_for(message) == "example.test"
    assert verify(signer.sign(message, time.time()), keys)


def test_no_from_or_two_from_is_unsigned(keys):
    signer = Signer([keys.ed])
    no_from = MESSAGE.replace(b"From: Joe Example <joe@example.test>\r\n", b"")
    two_from = b"from: joe@example.test\r\n" + MESSAGE
    for message in (no_from, two_from):
        assert signer.sign(message, time.time()) is message
        assert signer.signatures(message, time.time()) == []


def test_a_from_in_the_body_does_not_count(keys):
    message = MESSAGE.replace(b"Hello Ann", b"From: joe@example.test\r\nHello Ann")
    assert Signer([keys.ed]).domain_for(message) == "example.test"


# ------------------------------------------------------------------ the field itself

def test_folded_to_78_columns_and_t_is_int_now(keys):
    many = b"".join(b"To: r%d@receiver.test\r\n" % i for i in range(12))
    message = MESSAGE.replace(b"X-Mailer", many + b"X-Mailer")
    for key in (keys.rsa, keys.ed):
        (field,) = Signer([key]).signatures(message, 1_700_000_000.97)
        assert field.startswith(b"DKIM-Signature: v=1; a=") and field.endswith(b"\r\n")
        lines = field[:-2].split(b"\r\n")
        assert len(lines) > 3 and max(map(len, lines)) <= 78
        assert all(line[:1] == b" " for line in lines[1:])
        assert list(tags(field)) == ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]
        assert tags(field)["t"] == "1700000000" and tags(field)["c"] == "relaxed/relaxed"


def test_long_fields_still_verify(keys):
    many = b"".join(b"Cc: r%d@receiver.test\r\n" % i for i in range(30))
    message = MESSAGE.replace(b"X-Mailer", many + b"X-Mailer")
    assert verify(Signer([keys.rsa, keys.ed]).sign(message, time.time()), keys, idx=1)


# ------------------------------------------------------------------ loading keys

def _small_rsa_pem() -> bytes:
    """A 512-bit RSA key: cryptography no longer generates one, so build it from primes."""
    rng = random.Random(512)

    def probable_prime(bits: int) -> int:
        while True:
            n = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
            if (n - 1) % 65537 and all(pow(rng.randrange(2, n - 1), n - 1, n) == 1 for _ in range(20)):
                return n

    p, q = probable_prime(256), probable_prime(256)
    d = pow(65537, -1, (p - 1) * (q - 1))
    key = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(65537, p * q)).private_key()
    return pem(key)


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    (b"", "empty"),
    (b"  \n", "empty"),
    (b"hello, I am not a key\n", "not a key"),
    (base64.b64encode(b"x" * 31), "not a 32-byte Ed25519 seed"),
    (b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n", "not a readable PEM"),
    ("ec", "EC (secp256r1) key cannot sign"),
    ("small", "RSA key of 512 bits is too short"),
    ("public", "public key"),
    ("encrypted", "encrypted"),
])
def test_load_key_errors_name_the_setting_and_the_file(tmp_path, content, problem):
    path = tmp_path / "key.pem"
    if content == "ec":
        content = pem(ec.generate_private_key(ec.SECP256R1()))
    elif content == "small":
        content = _small_rsa_pem()
    elif content == "public":
        content = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    elif content == "encrypted":
        content = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"))
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DkimError) as err:
        load_key("example.test", "s1", str(path), where="dkim[3].key_file")
    assert str(err.value).startswith(f"dkim[3].key_file: {path}: ")
    assert problem in str(err.value)


def test_a_directory_is_not_a_key_file(tmp_path):
    with pytest.raises(DkimError, match=r"^dkim: .*: is a directory"):
        load_key("example.test", "s1", str(tmp_path))


def test_rsa_pkcs1_and_pkcs8_load_alike(keys):
    one = load_key("example.test", "rsa", str(keys.dir / "rsa.pem"))
    eight = load_key("example.test", "rsa", str(keys.dir / "rsa8.pem"))
    assert one.algorithm == eight.algorithm == "rsa-sha256"
    assert one.private_key.private_numbers() == eight.private_key.private_numbers()
    assert keys.seed.algorithm == "ed25519-sha256"


@pytest.mark.parametrize("kwargs, message", [
    ({"domain": "not a domain"}, "dkim[2].domain: 'not a domain' is not a domain name"),
    ({"selector": "s 1"}, "dkim[2].selector: 's 1' is not a selector"),
    ({"headers": ["subject", "to"]}, 'dkim[2].headers: must include "from"'),
    ({"headers": ["from", "bad:name"]}, "dkim[2].headers[1]: 'bad:name' is not a header field name"),
])
def test_entry_errors_name_the_field(keys, kwargs, message):
    args = {"domain": "example.test", "selector": "s1", "key_file": str(keys.dir / "ed.pem")} | kwargs
    with pytest.raises(DkimError) as err:
        load_key(**args, where="dkim[2].key_file")
    assert str(err.value).startswith(message)


def test_from_config(keys, tmp_path):
    assert Signer.from_config([]) is None
    entries = [DkimConfig(domain="example.test", selector="rsa", key_file=str(keys.dir / "rsa.pem")),
               DkimConfig(domain="Example.Test", selector="ed", key_file=str(keys.dir / "ed.pem"))]
    signer = Signer.from_config(entries)
    assert [k.selector for k in signer.keys] == ["rsa", "ed"]
    assert verify(signer.sign(MESSAGE, time.time()), keys, idx=1)

    missing = entries + [DkimConfig(domain="x.test", selector="s", key_file=str(tmp_path / "nope"))]
    with pytest.raises(DkimError, match=r"^dkim\[2\]\.key_file: .*nope: no such file"):
        Signer.from_config(missing)
    twice = entries + [DkimConfig(domain="example.test", selector="ed", key_file=str(keys.dir / "ed.seed"))]
    with pytest.raises(DkimError, match=r"^dkim\[2\]\.selector: 'ed' is already used for example.test by dkim\[1\]"):
        Signer.from_config(twice)
