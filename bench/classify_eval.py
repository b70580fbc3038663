"""How well ``sender.dsn`` reads real bounces: category agreement and recipient extraction.

Usage:
  python bench/classify_eval.py [--corpus DIR] [--show-misses [N]]

The corpus is ``$SENDER_CORPUS`` (or ``--corpus``), else ``../shared/corpus`` next to the
repository; it holds ``dsn/*.eml``, ``dsn/labels.jsonl`` (one line per recipient that sisimai's
tests expect) and ``dsn/reason-map.json`` (the fixed key: which of our categories agree with each
sisimai reason). Every labelled file is parsed once; each label line is matched to a parsed
recipient, by address when the label names one, else by position (``index``).

Scores:
  1. category agreement: a line agrees when our category, or ``kind:<our kind>``, is among those
     the reason maps to (a complaint, auto-reply or delivery report agrees by its kind even when
     no recipient was found in it);
  2. recipient extraction: of the lines whose label names a recipient, how many we extracted
     (compared without case).

Prints agreement overall and per reason, recipient accuracy, a confusion matrix (reason x our
category), PASS/FAIL against the targets (90% agreement, 95% recipients) and the time taken;
``--show-misses`` lists the lines that disagree with our category and diagnostic.
Exit status: 0 if both targets pass, 1 if one fails, 2 if the corpus is missing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sender import dsn  # noqa: E402

TARGET_AGREEMENT = 0.90
TARGET_RECIPIENTS = 0.95


def corpus_base(explicit: str | None = None) -> pathlib.Path:
    """Where the corpus should be: ``--corpus``, else ``$SENDER_CORPUS``, else ../shared/corpus.
    A place that is named is the only one looked at."""
    return pathlib.Path(explicit or os.environ.get("SENDER_CORPUS") or ROOT.parent / "shared" / "corpus")


def find_corpus(explicit: str | None = None) -> pathlib.Path | None:
    """The ``dsn`` folder of the corpus (the base itself may be it), or None."""
    base = corpus_base(explicit)
    for cand in (base / "dsn", base):
        if (cand / "labels.jsonl").is_file() and (cand / "reason-map.json").is_file():
            return cand
    return None


def match(label: dict, report: dsn.Report) -> dsn.RecipientReport | None:
    """The parsed recipient a label line is about."""
    want = (label.get("recipient") or "").lower()
    if want:
        for r in report.recipients:
            if (r.recipient or "").lower() == want:
                return r
        return None
    i = int(label.get("index") or 1) - 1
    return report.recipients[i] if 0 <= i < len(report.recipients) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="corpus folder (default: $SENDER_CORPUS or ../shared/corpus)")
    ap.add_argument("--show-misses", nargs="?", type=int, const=60, default=0, metavar="N",
                    help="list the first N disagreements (default 60)")
    args = ap.parse_args(argv)

    corpus = find_corpus(args.corpus)
    if corpus is None:
        print(f"corpus not found at {corpus_base(args.corpus)} (needs dsn/labels.jsonl and "
              f"dsn/reason-map.json; set SENDER_CORPUS or pass --corpus)", file=sys.stderr)
        return 2
    labels = [json.loads(line) for line in (corpus / "labels.jsonl").read_text().splitlines()
              if line.strip()]
    key = json.loads((corpus / "reason-map.json").read_text())["map"]

    started = time.perf_counter()
    reports: dict[str, dsn.Report] = {}
    for name in sorted({label["file"] for label in labels}):
        reports[name] = dsn.parse((corpus / name).read_bytes())
    parse_seconds = time.perf_counter() - started

    per_reason: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    confusion: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    agree = rcpt_named = rcpt_found = 0
    misses = []
    for label in labels:
        report = reports[label["file"]]
        ours = match(label, report)
        category = ours.category if ours else "-"
        wanted = key.get(label["reason"], [])
        ok = f"kind:{report.kind}" in wanted or (ours is not None and category in wanted)
        if report.kind != "bounce" and f"kind:{report.kind}" in wanted:
            category = f"kind:{report.kind}"
        per_reason[label["reason"]][0] += 1
        per_reason[label["reason"]][1] += ok
        confusion[label["reason"]][category] += 1
        agree += ok
        if label.get("recipient"):
            rcpt_named += 1
            rcpt_found += any((r.recipient or "").lower() == label["recipient"].lower()
                              for r in report.recipients)
        if not ok:
            misses.append((label, report, ours))

    total = len(labels)
    agreement = agree / total if total else 0.0
    recipients = rcpt_found / rcpt_named if rcpt_named else 0.0
    print(f"corpus: {corpus}  ({len(reports)} files, {total} label lines)")
    print(f"parsed in {parse_seconds:.2f} s ({1000 * parse_seconds / max(1, len(reports)):.2f} ms/file)")
    print()
    print(f"{'reason':<16} {'count':>5} {'agree':>5} {'%':>6}")
    for reason, (n, ok) in sorted(per_reason.items(), key=lambda kv: (-kv[1][0], kv[0])):
        print(f"{reason:<16} {n:>5} {ok:>5} {100 * ok / n:>5.1f}%")
    print()
    print("confusion (reason: our category x count)")
    for reason, counter in sorted(confusion.items(), key=lambda kv: -sum(kv[1].values())):
        cells = "  ".join(f"{cat} {n}" for cat, n in counter.most_common())
        print(f"  {reason:<16} {cells}")
    print()
    print(f"category agreement   {agree}/{total} = {100 * agreement:.1f}%  "
          f"(target {100 * TARGET_AGREEMENT:.0f}%)  {'PASS' if agreement >= TARGET_AGREEMENT else 'FAIL'}")
    print(f"recipient extraction {rcpt_found}/{rcpt_named} = {100 * recipients:.1f}%  "
          f"(target {100 * TARGET_RECIPIENTS:.0f}%)  {'PASS' if recipients >= TARGET_RECIPIENTS else 'FAIL'}")
    print(f"time: {time.perf_counter() - started:.2f} s")

    if args.show_misses:
        print()
        print(f"disagreements (first {min(args.show_misses, len(misses))} of {len(misses)}):")
        for label, report, ours in misses[: args.show_misses]:
            got = ours.category if ours else f"(no recipient matched; kind {report.kind}, " \
                                             f"{len(report.recipients)} parsed)"
            diag = (ours.diagnostic or "") if ours else ""
            status = ours.status if ours else None
            print(f"- {label['file']} #{label.get('index')} {label.get('recipient') or ''}")
            print(f"    expected {label['reason']} ({label.get('status')}), got {got} ({status})")
            if diag:
                print(f"    diagnostic: {diag[:200]}")
    return 0 if agreement >= TARGET_AGREEMENT and recipients >= TARGET_RECIPIENTS else 1


if __name__ == "__main__":
    sys.exit(main())
