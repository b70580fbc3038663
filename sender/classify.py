"""Reply classification: an SMTP reply, or the diagnostic text of a bounce, becomes one category
of a fixed vocabulary and a permanent/transient verdict.

The vocabulary is :data:`CATEGORIES`; ``expired`` and ``connection_failure`` are only made
locally (by delivery, for retries that ran out and connections that never got a reply), never by
:func:`classify`.

Steps, the first that decides wins (``Classification.rule`` says which):

1. The rules of ``classify_rules.toml``, in file order: provider texts (Google, Microsoft, Yahoo/AOL,
   Apple, GMX/Web.de, Mail.ru, Yandex, Comcast, Proofpoint, Mimecast, Barracuda), greylisting
   software, DNS block lists, then the common wordings of Postfix, Exim, Sendmail, qmail, Exchange
   and others. A rule matches when all the conditions it gives match: ``pattern`` (a regex searched
   case-insensitively in the text), ``codes`` (basic codes or classes such as "5xx") and
   ``enhanced`` (codes, or prefixes such as "5.7."; "" means "no enhanced code").
   ``rule`` is the rule's name.
2. The enhanced code (RFC 3463) through the file's ``[enhanced]`` table: the exact code, then its
   "class.subject." prefix. ``rule`` is ``"enhanced:"`` and the key, e.g. ``"enhanced:5.1.1"``.
3. The basic code through the ``[codes]`` table: the exact code, then its class ("5xx", "4xx").
   ``rule`` is ``"code:550"`` or ``"code:5xx"``. With no basic code, the class of the enhanced code
   stands in for it. With neither, the result is ``transient_other`` and ``rule`` is ``"default"``.

Input is taken as it comes: ``code`` may be 0 or anything else outside 400-599 (a bounce text
without a reply code); then a reply code at the start of the text is used ("550 5.1.1 ...", also
after a Diagnostic-Code type such as "smtp;"). ``enhanced`` may be given apart, or is found in the
text: at its start or the start of a line ("5.1.1 <user@x>: ..."), after a reply code
("... said: 550-5.1.1 ..."), or after a "#" as qmail and Exchange write it ("550 #5.1.0 Address
rejected"). Codes repeated inside multi-line or folded texts ("... due to 550-5.7.26 domain's
DMARC policy") are dropped before matching, and runs of white space count as one space. Only the
first :data:`MAX_TEXT` characters are read. Nothing raises: any int, any str, any ``enhanced``.

Permanence policy (:func:`_is_permanent`):

- A rule's ``permanent = true/false`` wins over everything below.
- ``greylisted`` and ``rate_limited`` are never permanent, whatever the code: some providers
  answer 5xx to a sender that only has to slow down: Gmail ("550 5.2.1 The user you are trying
  to contact is receiving email at a rate that prevents additional messages from being
  delivered", "550 5.7.1 This email has been rate limited", "550 5.4.5 Daily user sending limit
  exceeded"), GoDaddy ("550 ... has sent to too many recipients this hour. IB607"), Tencent QQ
  ("550 Ip frequency limited"), and MTAs answering "552 Too many recipients" (RFC 5321 4.5.3.1.10
  says to treat that one as 452).
- Otherwise a 5xx reply is permanent and a 4xx reply is not. So an ``invalid_recipient`` from a
  host that answers 450/451 for unknown users (Postfix with ``unknown_local_recipient_reject_code
  = 450``, soft_bounce, recipient verification that could not finish) stays that category but
  is retried.
- A 5xx whose text says to try again later, or calls the failure temporary ("try again later",
  "temporarily", "come back later"), is not permanent; where only the basic code decided
  (``permanent_other``), the category becomes ``transient_other``.
- With no basic code, the class of the enhanced code decides the same way (5: permanent,
  4: not). With neither, only categories that cannot get better by waiting are permanent:
  ``invalid_recipient``, ``bad_domain``, ``inactive_mailbox``, ``relay_denied``,
  ``message_too_large`` and ``permanent_other``.

``transient_other`` names a transient *cause* (a remote relay that gave up after its retries:
"554 4.4.7 Message expired"), so it may come with ``permanent=True`` when the reply itself is
final.

Speed: rules are compiled once (:func:`classify` loads the packaged file on first use). A call
visits only the alternatives of rules whose words occur in the text (see "the prefilter" below),
so a typical reply takes microseconds, not the hundred-odd regex searches of a plain loop.
"""

from __future__ import annotations

import re
import re._compiler as _sre_compile
import re._constants as _sre
import re._parser as _sre_parse
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from .model import Reply

__all__ = ["CATEGORIES", "MAX_TEXT", "Classification", "Rule", "Rules", "RulesError", "classify", "classify_reply",
           "load_rules"]

CATEGORIES: tuple[str, ...] = (
    "invalid_recipient",
    "bad_domain",
    "mailbox_full",
    "inactive_mailbox",
    "policy_block",
    "spam_content",
    "blocklisted_ip",
    "auth_failure",
    "rate_limited",
    "greylisted",
    "message_too_large",
    "relay_denied",
    "tls_required",
    "dns_failure",
    "service_unavailable",
    "transient_other",
    "permanent_other",
    "expired",              # made locally: retries ran past the message's lifetime
    "connection_failure",   # made locally: no SMTP reply at all
)

MAX_TEXT = 4096
"""Characters of ``text`` that classification reads; replies and diagnostics are far shorter."""

_NEVER_PERMANENT = frozenset({"greylisted", "rate_limited"})
# Permanent when there is no code at all to tell.
_PERMANENT_BY_NATURE = frozenset({
    "invalid_recipient", "bad_domain", "inactive_mailbox", "relay_denied", "message_too_large", "permanent_other",
})
_RULE_KEYS = frozenset({"name", "category", "pattern", "codes", "enhanced", "permanent", "provider"})
_TOP_KEYS = frozenset({"rule", "enhanced", "codes"})

_ENH = r"[245]\.\d{1,3}\.\d{1,3}(?!\.?\d)"
_ENHANCED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_ENHANCED_PREFIX = re.compile(r"[245]\.(?:\d{1,3}\.)?")
_CODE_CONDITION = re.compile(r"[45](?:\d\d|xx)", re.IGNORECASE)
# Start of a reply or a Diagnostic-Code value: "smtp; 550 5.1.1 ...", "550-5.1.1 ...", "#5.1.0 ...".
_LEAD = re.compile(
    r"\s*(?:(?:smtp|x-[\w.-]+|unknown)\s*;\s*)?(?:(?P<code>[45]\d\d)(?:[ -]+|$))?#?(?P<enh>" + _ENH + r")?",
    re.IGNORECASE,
)
# An enhanced code further in: at a line start, after a reply code, or after "#".
_INNER = re.compile(r"(?:(?<![\w.])(?P<code>[245]\d\d)[ -]#?|#|^[ \t]*)(?P<enh>" + _ENH + r")", re.MULTILINE)
# Reply codes repeated inside a text: "550-" continuations, "550 5.1.1 " prefixes of later lines.
_CODES_IN_TEXT = re.compile(r"[245](?<![\w.][245])\d\d(?:-|[ ](?=#?[245]\.\d))#?(?:" + _ENH + r")?[ \t]*")
_TRY_LATER = re.compile(
    r"\btry (?:again )?later\b|\btry again in \d|\bretry later\b|\bresend (?:your message )?(?:later|at a later time)\b"
    r"|\bcome back later\b|\btemporar(?:y|ily)\b",
    re.IGNORECASE,
)
# Before ``str.lower()``, the only characters that re.IGNORECASE equates with an ASCII letter but
# that do not lower-case to it; with them mapped, an ASCII needle found by ``in`` in the folded
# text is a necessary condition for the case-insensitive regex to match.
_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s"})


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the rule (index and name) or table key
    and what is wrong with it."""


class Classification(msgspec.Struct, frozen=True):
    """What a reply means.

    Attributes:
      category: one of :data:`CATEGORIES`.
      permanent: retrying the same message to the same recipient will not help.
      enhanced: the RFC 3463 code used ("" if none), e.g. "5.1.1".
      rule: which rule decided: its name in the rules file, ``"enhanced:5.1.1"``,
        ``"code:550"``/``"code:5xx"``, or ``"default"``.
    """

    category: str
    permanent: bool
    enhanced: str
    rule: str


class Rule(msgspec.Struct, frozen=True):
    """One rule as written in the rules file (for listing and explaining; matching uses a
    compiled form)."""

    name: str
    category: str
    pattern: str | None = None
    codes: tuple[str, ...] = ()
    enhanced: tuple[str, ...] = ()
    permanent: bool | None = None
    provider: str = ""


class _Compiled:
    __slots__ = ("name", "category", "branches", "codes", "classes", "enh_exact", "enh_prefixes", "permanent")

    def __init__(self, rule: Rule, branches, codes, classes, enh_exact, enh_prefixes) -> None:
        self.name = rule.name
        self.category = rule.category
        self.branches = branches
        self.codes = codes
        self.classes = classes
        self.enh_exact = enh_exact
        self.enh_prefixes = enh_prefixes
        self.permanent = rule.permanent


class Rules:
    """A validated rules file, ready to classify. Immutable; load a new one to change rules.

    Args:
      doc: the parsed TOML document.
      source: where it came from, for error messages.

    Raises:
      RulesError: anything wrong in ``doc``.
    """

    def __init__(self, doc: dict, source: str = "<rules>") -> None:
        self.source = source
        unknown = sorted(set(doc) - _TOP_KEYS)
        if unknown:
            raise RulesError(f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}"
                             f" (expected [[rule]], [enhanced], [codes])")
        raw_rules = doc.get("rule", [])
        if not isinstance(raw_rules, list):
            raise RulesError(f"{source}: 'rule' must be an array of tables ([[rule]])")
        rules: list[Rule] = []
        compiled: list[_Compiled] = []
        seen: dict[str, int] = {}
        for index, raw in enumerate(raw_rules):
            rule, comp = _compile_rule(index, raw, seen)
            rules.append(rule)
            compiled.append(comp)
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._compiled = tuple(compiled)
        # The alternatives a text can reach, numbered in rule order: by key, and those without
        # keys (visited whatever the text). A rule without a pattern counts as one alternative.
        self._steps: list[tuple[_Compiled, str, object, bool]] = []
        index: dict[bytes, set[int]] = {}
        always = set()
        for r in compiled:
            for keys, needle, search, on_folded, _ in r.branches or ((None, "", None, False, ""),):
                step = len(self._steps)
                self._steps.append((r, needle, search, on_folded))
                if keys is None:
                    always.add(step)
                for key in keys or ():
                    index.setdefault(key, set()).add(step)
        self._index = {key: frozenset(steps) for key, steps in index.items()}
        self._always = frozenset(always)
        self.enhanced_table: dict[str, str] = _table(doc.get("enhanced", {}), "enhanced", _check_enhanced_key)
        self.codes_table: dict[str, str] = _table(doc.get("codes", {}), "codes", _check_code_key)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"<Rules {self.source}: {len(self.rules)} rules>"

    def classify(self, code: int, text: str, enhanced: str | None = None) -> Classification:
        """Classify one reply; see the module docstring for the steps and the permanence policy.

        Args:
          code: the basic reply code; 0 (or anything outside 400-599) when there is none.
          text: the reply text (lines joined by "\\n"), or a bounce's diagnostic text.
          enhanced: the RFC 3463 code when known apart from the text.

        Returns:
          The :class:`Classification`; never raises.
        """
        try:
            return self._classify(code, text, enhanced)
        except Exception:  # noqa: BLE001 - a classifier bug must not take down delivery
            permanent = isinstance(code, int) and 500 <= code <= 599
            return Classification("permanent_other" if permanent else "transient_other", permanent, "", "default")

    def _classify(self, code, text, enhanced) -> Classification:
        basic, cls, enh, flat = _normalize(code, text, enhanced)
        folded = flat.lower() if flat.isascii() else flat.translate(_FOLD).lower()
        reachable = set(self._always)
        index = self._index
        for key in _text_keys(folded):
            steps = index.get(key)
            if steps is not None:
                reachable |= steps

        steps = self._steps
        last = passed = None
        for i in sorted(reachable):
            r, needle, search, on_folded = steps[i]
            if r is not last:
                last = r
                passed = ((r.codes is None or basic in r.codes or cls in r.classes)
                          and (r.enh_exact is None or enh in r.enh_exact or enh.startswith(r.enh_prefixes)))
            if passed and (search is None or (needle in folded and search(folded if on_folded else flat) is not None)):
                return Classification(r.category, _is_permanent(r.category, cls, flat, r.permanent), enh, r.name)

        if enh:
            subject = enh[: enh.index(".", 2) + 1]
            for key in (enh, subject):
                category = self.enhanced_table.get(key)
                if category is not None:
                    return Classification(category, _is_permanent(category, cls, flat, None), enh, "enhanced:" + key)
        if cls:
            key = str(basic) if basic else ""
            category = self.codes_table.get(key) if key else None
            if category is None:
                key = f"{cls}xx"
                category = self.codes_table.get(key, "permanent_other" if cls == 5 else "transient_other")
            permanent = _is_permanent(category, cls, flat, None)
            if category == "permanent_other" and not permanent:
                category = "transient_other"
            return Classification(category, permanent, enh, "code:" + key)
        return Classification("transient_other", False, enh, "default")


def _normalize(code, text, enhanced) -> tuple[int, int, str, str]:
    """The inputs as the steps use them: (basic code or 0, class 5/4/0, enhanced code or "",
    the text to match), per the module docstring."""
    basic = int(code) if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 0
    if not isinstance(text, str):
        text = ""
    elif len(text) > MAX_TEXT:
        text = text[:MAX_TEXT]
    enh = ""
    if isinstance(enhanced, str) and enhanced:
        enh = enhanced.strip().lstrip("#")
        if not _ENHANCED_CODE.fullmatch(enh):
            enh = ""
    lead = _LEAD.match(text)
    if not basic and lead.group("code"):
        basic = int(lead.group("code"))
    if not enh:
        if lead.group("enh"):
            enh = lead.group("enh")
        else:
            inner = _INNER.search(text)
            if inner:
                enh = inner.group("enh")
                if not basic and inner.group("code") and inner.group("code")[0] in "45":
                    basic = int(inner.group("code"))
    if basic:
        cls = basic // 100
    else:
        cls = int(enh[0]) if enh and enh[0] in "45" else 0
    flat = text[lead.end():]
    if "-" in flat or " 5." in flat or " 4." in flat or " 2." in flat or " #" in flat:  # else no code inside
        flat = _CODES_IN_TEXT.sub(" ", flat)
    if "  " in flat or not flat.isprintable():   # line breaks, tabs, runs of spaces
        flat = " ".join(flat.split())
    elif flat[:1] == " " or flat[-1:] == " ":
        flat = flat.strip()
    return basic, cls, enh, flat


def _is_permanent(category: str, cls: int, text: str, forced: bool | None) -> bool:
    """The permanence policy of the module docstring, in one place.

    Args:
      category: the category decided.
      cls: 5 or 4 from the basic code (or, without one, the enhanced code), else 0.
      text: the normalized text, for "try again later" wording.
      forced: the deciding rule's ``permanent``, if it sets one.
    """
    if forced is not None:
        return forced
    if category in _NEVER_PERMANENT:
        return False
    if cls == 5:
        folded = text.lower() if text.isascii() else text.translate(_FOLD).lower()
        # every alternative of _TRY_LATER holds one of these words
        return not (("later" in folded or "temporar" in folded or "try again in" in folded)
                    and _TRY_LATER.search(text))
    if cls == 4:
        return False
    return category in _PERMANENT_BY_NATURE


# ---------------------------------------------------------------- loading and validation


def _compile_rule(index: int, raw, seen: dict[str, int]) -> tuple[Rule, _Compiled]:
    name = raw.get("name") if isinstance(raw, dict) else None
    where = f"rule {index} {name!r}" if isinstance(name, str) and name else f"rule {index}"
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: must be a table")

    def bad(what: str) -> RulesError:
        return RulesError(f"{where}: {what}")

    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_RULE_KEYS))}")
    if not isinstance(name, str) or not name.strip():
        raise bad("'name' is missing or empty")
    if name in seen:
        raise bad(f"duplicate name (first used by rule {seen[name]})")
    seen[name] = index
    category = raw.get("category")
    if category not in CATEGORIES:
        raise bad(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    pattern = raw.get("pattern")
    branches = None
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise bad("'pattern' must be a non-empty string")
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise bad(f"bad pattern: {e}") from None
        branches = _branches(pattern)
    codes = classes = None
    code_list: list[str] = []
    if "codes" in raw:
        codes, classes = set(), set()
        for item in _list(raw["codes"], "codes", bad):
            text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
            if not isinstance(text, str) or not _CODE_CONDITION.fullmatch(text):
                raise bad(f"bad entry {item!r} in 'codes': expected a reply code such as 550 "
                          f"or a class such as \"5xx\"")
            code_list.append(text.lower())
            if text[1:].lower() == "xx":
                classes.add(int(text[0]))
            else:
                codes.add(int(text))
        codes, classes = frozenset(codes), frozenset(classes)
    enh_exact = None
    enh_prefixes: tuple[str, ...] = ()
    enh_list: list[str] = []
    if "enhanced" in raw:
        exact = set()
        for item in _list(raw["enhanced"], "enhanced", bad):
            if not isinstance(item, str) or not (item == "" or _ENHANCED_CODE.fullmatch(item)
                                                 or _ENHANCED_PREFIX.fullmatch(item)):
                raise bad(f"bad entry {item!r} in 'enhanced': expected a code such as \"5.1.1\", "
                          f"a prefix such as \"5.7.\", or \"\" for none")
            enh_list.append(item)
            if item.endswith("."):
                enh_prefixes += (item,)
            else:
                exact.add(item)
        enh_exact = frozenset(exact)
    permanent = raw.get("permanent")
    if permanent is not None and not isinstance(permanent, bool):
        raise bad("'permanent' must be true or false")
    provider = raw.get("provider", "")
    if not isinstance(provider, str):
        raise bad("'provider' must be a string")
    if branches is None and codes is None and enh_exact is None:
        raise bad("has no condition: give at least one of 'pattern', 'codes', 'enhanced'")
    rule = Rule(name, category, pattern, tuple(code_list), tuple(enh_list), permanent, provider)
    return rule, _Compiled(rule, branches, codes, classes, enh_exact, enh_prefixes)


# ---------------------------------------------------------------- the prefilter
# Python's re tries every alternative at every position of a case-insensitive pattern, so a rule
# of twenty alternatives costs tens of microseconds per text, and a hundred rules a millisecond.
# So each pattern is split into its top-level alternatives, and each alternative gets "keys": the
# first four letters of words it cannot match without, in lower case, taken where the pattern
# fixes the start of a word (after a space, "\\b", "^", ...). A text's keys are the first four
# characters of its words (runs of [a-z0-9] in the lower-cased text); an alternative whose keys
# are all missing cannot match, and a rule none of whose alternatives can match is not visited.
# Each alternative also has a "needle", its longest literal, checked with ``in`` before its regex.
# Both checks only ever skip work, never change a result: tests compare against a plain loop over
# the rules, and against texts generated from each alternative.

_WORD = re.compile(r"[a-z0-9]+")
_BOUNDARY_ATS = frozenset({_sre.AT_BOUNDARY, _sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING, _sre.AT_END,
                           _sre.AT_END_STRING})


_NOT_WORD = bytes(c if 97 <= c <= 122 or 48 <= c <= 57 else 32 for c in range(256))


def _text_keys(folded: str) -> set[bytes]:
    """The keys of a folded text: the first four characters of its [a-z0-9] words, as bytes."""
    if folded.isascii():
        return {w[:4] for w in folded.encode().translate(_NOT_WORD).split()}
    return {w[:4].encode() for w in _WORD.findall(folded)}


def _branches(pattern: str) -> tuple[tuple[frozenset[bytes] | None, str, object, bool, str], ...]:
    """The pattern's top-level alternatives as (keys, needle, search, on_folded, source), or the
    whole pattern as one alternative when splitting it could change its meaning
    (back-references, global flags). ``search`` is to be given the folded text when
    ``on_folded``, else the normalized text."""
    parts = [pattern]
    if not re.search(r"\\[1-9]|\(\?P=|^\(\?[a-zA-Z]+\)", pattern):
        parts = _split_alternatives(pattern)
        try:
            for part in parts:
                re.compile(part, re.IGNORECASE)
        except re.error:
            parts = [pattern]
    out = []
    for part in parts:
        search, on_folded = _searcher(part)
        try:
            items = _sre_parse.parse(part, re.IGNORECASE).data
        except Exception:  # noqa: BLE001 - the prefilter is an optimization only
            out.append((None, "", search, on_folded, part))
            continue
        out.append((_keys(items, False), _needle(items), search, on_folded, part))
    return tuple(out)


def _searcher(part: str):
    """A search for one alternative, and whether it runs on the folded text.

    Where the alternative's literals are ASCII, it is compiled lower-cased and without
    re.IGNORECASE, to run on the folded text: for every character c, the folded c is an ASCII
    letter exactly when re.IGNORECASE equates c with that letter, keeps its length and whether it
    is a word character, so the result is the same, and re can scan for a first character, which
    it cannot do case-insensitively. A leading "\\b" is checked in Python after searching for
    the rest, for the same reason.
    """
    try:
        tree = _sre_parse.parse(part, 0)
        if tree.state.flags & ~re.UNICODE or not _lower_tree(tree.data):
            raise ValueError(part)
        bounded = len(tree.data) > 1 and tree.data[0] == (_sre.AT, _sre.AT_BOUNDARY)
        if bounded:
            del tree.data[0]
        search = _sre_compile.compile(tree, 0).search
    except Exception:  # noqa: BLE001 - fall back to the plain case-insensitive regex
        return re.compile(part, re.IGNORECASE).search, False
    return (_after_boundary(search) if bounded else search), True


def _after_boundary(rest):
    def search(text: str):
        pos = 0
        while (m := rest(text, pos)) is not None:
            p = m.start()
            before = p > 0 and (text[p - 1].isalnum() or text[p - 1] == "_")
            after = p < len(text) and (text[p].isalnum() or text[p] == "_")
            if before != after:
                return m
            pos = p + 1
        return None
    return search


def _lower_tree(items) -> bool:
    """Lower-case the literals of a parsed pattern in place; False where that is not possible
    (non-ASCII literals, scoped flags, back-references)."""
    for i, (op, av) in enumerate(items):
        if op is _sre.LITERAL or op is _sre.NOT_LITERAL:
            if av >= 128:
                return False
            items[i] = (op, ord(chr(av).lower()))
        elif op is _sre.IN:
            members = []
            for kind, value in av:
                if kind is _sre.LITERAL:
                    if value >= 128:
                        return False
                    members.append((kind, ord(chr(value).lower())))
                elif kind is _sre.RANGE:
                    if value[1] >= 128:
                        return False
                    members += [(_sre.LITERAL, c) for c in sorted({ord(chr(c).lower())
                                                                  for c in range(value[0], value[1] + 1)})]
                elif kind is _sre.NEGATE or kind is _sre.CATEGORY:
                    members.append((kind, value))
                else:
                    return False
            items[i] = (op, members)
        elif op is _sre.SUBPATTERN:
            if av[1] or av[2] or not _lower_tree(av[3].data):
                return False
        elif op is _sre.BRANCH:
            if not all(_lower_tree(alternative.data) for alternative in av[1]):
                return False
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            if not _lower_tree(av[2].data):
                return False
        elif op is _sre.ASSERT or op is _sre.ASSERT_NOT:
            if not _lower_tree(av[1].data):
                return False
        elif op is _sre.ATOMIC_GROUP:
            if not _lower_tree(av.data):
                return False
        elif op not in (_sre.AT, _sre.ANY, _sre.CATEGORY):
            return False
    return True


def _split_alternatives(pattern: str) -> list[str]:
    """Split on "|" outside groups, character classes and escapes."""
    parts, depth, start, i, n, in_class = [], 0, 0, 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            j = i + 1 + (pattern[i + 1 : i + 2] == "^")
            if pattern[j : j + 1] == "]":   # "[]" or "[^]": that "]" is a member
                i = j
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts


def _keys(items, left_bounded: bool) -> frozenset[str] | None:
    """Keys of a parsed sequence: a set of which every match contains one; None when there is
    none. Short literal choices ("[ae]", "(?:S|AS)", "-?") are followed as variants.

    Args:
      items: the sequence, as re's parser gives it.
      left_bounded: a word cannot go on to the left of where the sequence starts.
    """
    best: frozenset[str] | None = None
    variants = [""]
    run_left = bounded = left_bounded

    def consider(keys) -> None:
        nonlocal best
        if keys and (best is None or _cost(keys) < _cost(best)):
            best = keys

    def flush(right_bounded: bool) -> None:
        nonlocal variants
        if variants != [""]:
            keys = set()
            for text in variants:
                key = None
                for m in _WORD.finditer(text):
                    word = m.group()
                    if (m.start() > 0 or run_left) and (len(word) >= 4 or m.end() < len(text) or right_bounded):
                        if key is None or _cost((word[:4],)) < _cost((key,)):
                            key = word[:4]
                if key is None:
                    break
                keys.add(key.encode())
            else:
                consider(frozenset(keys))
        variants = [""]

    for op, av in items:
        choices = _literal_choices(op, av)
        if choices is not None and len(variants) * len(choices) <= 256:
            if variants == [""]:
                run_left = bounded
            variants = [v + c for v in variants for c in choices]
            last = choices[0][-1:] if all(choices) else ""
            bounded = bool(last) and not ("a" <= last <= "z" or "0" <= last <= "9") and all(
                c[-1:] == last for c in choices)
            continue
        if op is _sre.AT and av in _BOUNDARY_ATS:
            flush(True)
            bounded = True
            continue
        flush(False)
        if choices is None and op is _sre.SUBPATTERN:
            consider(_keys(av[3].data, bounded))
        elif choices is None and op is _sre.BRANCH:
            alternatives = [_keys(a.data, bounded) for a in av[1]]
            if all(alternatives):
                consider(frozenset().union(*alternatives))
        bounded = False
    flush(False)
    return best


# Words too common in replies to make good keys: a text with one of them reaches many rules.
_COMMON = frozenset("""the for and you your not mail emai user addr reci mess from this that with has
been have was are plea more info see http www com serv doma acco deli sent rece rejec reje deni
acce""".split())


def _cost(keys) -> tuple[int, int]:
    return (sum(8 if (k.decode() if isinstance(k, bytes) else k) in _COMMON else 1 for k in keys),
            -min(map(len, keys)))


def _literal_choices(op, av) -> list[str] | None:
    """The strings a small literal construct can match, lower-cased: a literal, a class of a few
    ASCII letters or digits, an optional literal, or a group of literal alternatives."""
    if op is _sre.LITERAL:
        return [chr(av).lower()] if av < 128 else None
    if op is _sre.IN:
        chars = []
        for kind, value in av:
            if kind is _sre.LITERAL and value < 128:
                chars.append(chr(value).lower())
            elif kind is _sre.RANGE and value[1] - value[0] < 10 and value[1] < 128:
                chars.extend(chr(c).lower() for c in range(value[0], value[1] + 1))
            else:
                return None
        chars = sorted(set(chars))
        if len(chars) > 10 or not all(c.isalnum() for c in chars):
            return None
        return chars
    if op is _sre.MAX_REPEAT and av[0] == 0 and av[1] == 1:
        inner = _sequence_choices(av[2])
        return None if inner is None else [""] + inner
    if op is _sre.SUBPATTERN:
        return _sequence_choices(av[3])
    if op is _sre.BRANCH:
        out = []
        for alternative in av[1]:
            inner = _sequence_choices(alternative)
            if inner is None:
                return None
            out += inner
        return out if len(out) <= 16 else None
    return None


def _sequence_choices(seq) -> list[str] | None:
    out = [""]
    for op, av in (seq.data if hasattr(seq, "data") else seq):
        choices = _literal_choices(op, av)
        if choices is None or len(out) * len(choices) > 16:
            return None
        out = [v + c for v in out for c in choices]
    return out


def _needle(items) -> str:
    """The longest run of ASCII literals in a parsed sequence (groups included), lower-cased."""
    best = ""
    run: list[str] = []

    def walk(items) -> None:
        nonlocal best
        for op, av in items:
            if op is _sre.LITERAL and av < 128:
                run.append(chr(av))
                continue
            if len(run) > len(best):
                best = "".join(run)
            run.clear()
            if op is _sre.SUBPATTERN:
                walk(av[3].data)
                if len(run) > len(best):
                    best = "".join(run)
                run.clear()

    walk(items)
    if len(run) > len(best):
        best = "".join(run)
    return best.lower()


def _list(value, key: str, bad) -> Iterable:
    if not isinstance(value, list) or not value:
        raise bad(f"'{key}' must be a non-empty list")
    return value


def _check_enhanced_key(key: str) -> bool:
    return bool(_ENHANCED_CODE.fullmatch(key) or re.fullmatch(r"[245]\.\d{1,3}\.", key))


def _check_code_key(key: str) -> bool:
    return bool(re.fullmatch(r"[45](?:\d\d|xx)", key))


def _table(value, name: str, check) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RulesError(f"[{name}] must be a table")
    out = {}
    for key, category in value.items():
        if not check(key):
            raise RulesError(f"[{name}] key {key!r}: not a valid key"
                             + (" (a code such as \"5.1.1\" or a prefix such as \"5.7.\")" if name == "enhanced"
                                else " (a code such as \"550\" or a class \"5xx\"/\"4xx\")"))
        if category not in CATEGORIES:
            raise RulesError(f"[{name}] key {key!r}: unknown category {category!r}")
        out[key] = category
    return out


def load_rules(path: str | Path | None = None) -> Rules:
    """Load and validate a rules file.

    Args:
      path: a TOML rules file; by default the ``classify_rules.toml`` shipped in this package.

    Raises:
      RulesError: the file is not valid TOML, or a rule or table entry is wrong.
      OSError: the file cannot be read.
    """
    if path is None:
        source = "sender/classify_rules.toml"
        data = resources.files(__package__).joinpath("classify_rules.toml").read_text(encoding="utf-8")
    else:
        source = str(path)
        data = Path(path).read_text(encoding="utf-8")
    try:
        doc = tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: {e}") from None
    return Rules(doc, source)


_default: Rules | None = None


def classify(code: int, text: str, enhanced: str | None = None) -> Classification:
    """Classify one reply with the packaged rules (loaded once, on first use).

    See :meth:`Rules.classify`.
    """
    global _default
    rules = _default
    if rules is None:
        rules = _default = load_rules()
    return rules.classify(code, text, enhanced)


def classify_reply(reply: Reply) -> Classification:
    """:func:`classify` for a :class:`~sender.model.Reply` (its code, text and enhanced code)."""
    return classify(reply.code, reply.text, reply.enhanced or None)
