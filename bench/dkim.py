"""DKIM signing: sender.dkim against dkimpy, ms per signature and the ratio, in one run.

Usage: python bench/dkim.py [--iterations 300] [--max-seconds 5]

Each figure signs a 2 KB or a 50 KB message ``--iterations`` times (stopping early after
``--max-seconds``) with an RSA-2048 or an Ed25519 key, relaxed/relaxed and the same h= list
on both sides; sender.dkim's time includes finding the From: domain and folding the field.
Before timing, one signature from each side is checked with dkimpy's verifier, so a fast
wrong answer cannot win.
"""

from __future__ import annotations

import argparse
import base64
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# This file is named dkim.py too: put the repository where its own folder was, so that
# "import dkim" finds dkimpy rather than this script.
sys.path = [str(ROOT)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT / "bench"]

import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

from sender.dkim import Signer, load_key  # noqa: E402

HEAD = (b"From: Bench <bench@example.test>\r\nTo: someone@receiver.test\r\n"
        b"Subject: a message of some size\r\nDate: Tue, 14 May 2024 10:00:00 +0000\r\n"
        b"Message-ID: <bench@example.test>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
LINE = b"The quick brown fox  jumps over\tthe lazy dog, and then it does so again. \r\n"


def message(size: int) -> bytes:
    return HEAD + LINE * ((size - len(HEAD)) // len(LINE) + 1)


def per_call(fn, iterations: int, max_seconds: float) -> float:
    fn()                                                   # warm up
    done, start = 0, time.perf_counter()
    while done < iterations:
        fn()
        done += 1
        if time.perf_counter() - start > max_seconds:
            break
    return (time.perf_counter() - start) / done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300, help="signatures per figure (300)")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="cap per figure (5)")
    args = ap.parse_args(argv)

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    ed_seed = base64.b64encode(ed_key.private_bytes(serialization.Encoding.Raw,
                                                    serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption()))
    records = {
        b"rsa._domainkey.example.test.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(
            rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)),
        b"ed._domainkey.example.test.": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(
            ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)),
    }

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)

    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "rsa.pem").write_bytes(rsa_pem)
        (pathlib.Path(tmp) / "ed.seed").write_bytes(ed_seed)
        ours = {"rsa-sha256": Signer([load_key("example.test", "rsa", f"{tmp}/rsa.pem")]),
                "ed25519-sha256": Signer([load_key("example.test", "ed", f"{tmp}/ed.seed")])}
    peer_key = {"rsa-sha256": (b"rsa", rsa_pem), "ed25519-sha256": (b"ed", ed_seed)}

    sizes = {"2 KB": message(2048), "50 KB": message(50 * 1024)}
    results: dict[tuple[str, str], tuple[float, float]] = {}
    for algorithm, signer in ours.items():
        selector, key = peer_key[algorithm]
        for label, msg in sizes.items():
            field = signer.signatures(msg, time.time())[0]
            h = field.decode().replace("\r\n", "").split(" h=")[1].split(";")[0]
            include = [name.strip().encode() for name in h.split(":")]

            def peer(msg=msg, selector=selector, key=key, include=include, algorithm=algorithm):
                return dkim.sign(msg, selector, b"example.test", key,
                                 canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
                                 signature_algorithm=algorithm.encode())

            for name, signed in (("sender.dkim", field + msg), ("dkimpy", peer() + msg)):
                if not dkim.verify(signed, dnsfunc=dnsfunc):
                    print(f"{name} {algorithm} {label}: dkimpy does not verify it", file=sys.stderr)
                    return 1
            results[algorithm, label] = (
                per_call(lambda msg=msg, signer=signer: signer.signatures(msg, time.time()),
                         args.iterations, args.max_seconds),
                per_call(peer, args.iterations, args.max_seconds))

    print(f"DKIM signing, ms per signature (up to {args.iterations} each, relaxed/relaxed):")
    print(f"{'':16}" + "".join(f"{label:>31}" for label in sizes))
    print(f"{'':16}" + f"{'sender.dkim':>13}{'dkimpy':>10}{'ratio':>8}" * len(sizes))
    for algorithm in ours:
        row = f"{algorithm:16}"
        for label in sizes:
            mine, theirs = results[algorithm, label]
            row += f"{mine * 1e3:>13.3f}{theirs * 1e3:>10.3f}{theirs / mine:>7.1f}x"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
