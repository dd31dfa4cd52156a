"""The content filter: refuses a turn's text before any work is done for it.

Off by default. An operator turns it on with either setting, or both:

- `content_filter_words`: a UTF-8 file, one entry a line; blank lines and lines starting with
  `#` are skipped. A plain line is a word or phrase, matched case-insensitively as whole words
  (`ass` does not match `class`; the words of a phrase may be split by any run of whitespace).
  A line `re:PATTERN` is a Python regular expression, searched case-insensitively.
- `content_filter_hook`: `module:function`, imported once at start-up and called as
  `function(text: str) -> str | None` for each turn: a reason to refuse it, or None to accept.

A refused turn is a non-fatal `content_rejected` error that names the turn (docs/protocol.md).
Bad settings raise ValueError from the constructor, so the server does not start with a filter
that silently lets everything through.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ..protocol.messages import Code, ProtocolError, TurnSpec

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("vibecast.content_filter")

WORDS_SETTING = "content_filter_words"
HOOK_SETTING = "content_filter_hook"
# A listed word or phrase longer than this is almost surely a pasted paragraph, not an entry;
# the bound also keeps the recursion that builds the word pattern shallow.
MAX_ENTRY_CHARS = 200
MAX_REASON_CHARS = 200  # of a hook's reason, as quoted back to the client
# How much of a streamed turn's text before a piece is checked with it: several times the longest
# listed entry, so a word or phrase split across pieces is found when its last piece comes, while
# a turn sent one character at a time costs the filter a bounded amount per piece, not the whole
# text again each time.
STREAM_CONTEXT_CHARS = 1000

Hook = Callable[[str], str | None]
_Trie = dict[str, "_Trie"]  # one character -> the entries' rest; key _END: an entry ends here

_END = ""  # a real key is always one character
_WORD_CHAR = re.compile(r"\w")
_SPACE = re.compile(r"\s")


@dataclass(frozen=True)
class _Pattern:
    line: int
    source: str  # as written after `re:`, quoted back to the client
    regex: re.Pattern[str]


class HookFailed(Exception):
    """The hook raised, or returned something other than a string or None."""


def _normal(text: str) -> str:
    """The key a listed phrase and the text it matched share: whitespace runs made one space,
    case folded."""
    return " ".join(text.split()).casefold()


def _is_word_char(ch: str) -> bool:
    return _WORD_CHAR.match(ch) is not None


class ContentFilter:
    def __init__(self, words: str | None = None, hook: str | None = None) -> None:
        self.words: dict[str, str] = {}  # _normal(entry) -> the entry as listed
        self.patterns: list[_Pattern] = []
        self.hook: Hook | None = None
        self.hook_name = hook
        self._words_re: re.Pattern[str] | None = None
        if words is not None:
            self._load(words)
        if hook is not None:
            self.hook = _import_hook(hook)

    @classmethod
    def from_config(cls, config: ServerConfig) -> ContentFilter:
        return cls(config.content_filter_words, config.content_filter_hook)

    @property
    def enabled(self) -> bool:
        return bool(self.words or self.patterns or self.hook)

    # -- loading -------------------------------------------------------------------------------

    def _load(self, path: str) -> None:
        where = f"{WORDS_SETTING} = {path!r}"
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{where}: cannot read the file ({e.strerror or e}).") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(
                f"{where}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file "
                "as UTF-8."
            ) from None
        # Split on "\n" only: str.splitlines also breaks at form feeds and U+2028, which would
        # make the line numbers in these messages disagree with the operator's editor.
        for n, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.startswith("re:"):
                self.patterns.append(_compile_pattern(entry[3:].strip(), f"{where}, line {n}", n))
                continue
            if len(entry) > MAX_ENTRY_CHARS:
                raise ValueError(
                    f"{where}, line {n}: a word or phrase of {len(entry)} characters; entries "
                    f"have at most {MAX_ENTRY_CHARS} (write a longer rule as re:PATTERN)."
                )
            self.words.setdefault(_normal(entry), " ".join(entry.split()))
        if self.words:
            self._words_re = re.compile(_words_pattern(list(self.words.values())), re.IGNORECASE)
        if not self.words and not self.patterns:
            log.warning("%s: the file lists nothing, so it refuses nothing", where)

    # -- checking ------------------------------------------------------------------------------

    def check(self, turns: Sequence[TurnSpec], first: int = 0) -> None:
        """Raise content_rejected for the first of `turns` (numbered from `first` in the
        session's script) whose text the filter refuses."""
        if not self.enabled:
            return
        for i, t in enumerate(turns):
            field = f"turns[{i}].text"
            # An append's turns[i] is not the session's turn i: say which one it is.
            label = field if first == 0 else f"{field} (turn {first + i} of the script)"
            self.check_text(t.text, field, first + i, label)

    def check_piece(self, before: str, piece: str, turn: int) -> None:
        """Raise content_rejected when the filter refuses `piece`, the next piece of streamed turn
        `turn`'s text, in the context of the text before it (`before`): its last
        STREAM_CONTEXT_CHARS, from the start of a word, so the hook sees whole words and a word
        split across pieces is found whole. The same rules as a turn's text; a match that ends
        where the piece ends counts, even if the next piece would have gone on with the word."""
        if not self.enabled or not piece:
            return
        start = max(0, len(before) - STREAM_CONTEXT_CHARS)
        if start:
            space = _SPACE.search(before, start)
            if space is not None:
                start = space.end()
        self.check_text(
            before[start:] + piece,
            "text.text",
            turn,
            f"text.text (turn {turn})",
            "this piece was not added; send it rephrased (the turn's text before it stays)",
        )

    def check_text(
        self,
        text: str,
        field: str,
        turn: int | None = None,
        label: str | None = None,
        fix: str = "rephrase that line",
    ) -> None:
        """Raise content_rejected when the filter refuses `text`; `field` and `turn` go into the
        error, `label` (default: `field`) is how its message names the text, `fix` what to do."""
        label = label or field
        try:
            verdict = self._verdict(text)
        except HookFailed:
            # Fail closed: a filter that crashes must not let the text through. The traceback
            # is for the operator; the client learns only that the filter failed.
            log.exception("content filter hook %s failed on %s", self.hook_name, label)
            raise ProtocolError(
                Code.CONTENT_REJECTED,
                f"the content filter failed on {label}; the server's operator has been told.",
                field=field,
                turn=turn,
            ) from None
        if verdict is None:
            return
        rule, phrase = verdict
        # The rule, never the client's text: scripts stay out of the log.
        log.info("content_rejected %s turn=%s by %s", field, turn, rule)
        raise ProtocolError(
            Code.CONTENT_REJECTED,
            f"{label} {phrase}; {fix}.",
            field=field,
            turn=turn,
        )

    def _verdict(self, text: str) -> tuple[str, str] | None:
        """(the rule for the log, what the client is told) when `text` is refused, else None."""
        if self._words_re is not None:
            found = self._words_re.search(text)
            if found is not None:
                matched = " ".join(found.group().split())
                listed = self.words.get(_normal(matched), matched)
                return (
                    f"listed word {listed!r}",
                    f'contains "{listed}", which this server\'s content filter does not accept',
                )
        for p in self.patterns:
            if p.regex.search(text):
                return (
                    f"pattern on line {p.line}",
                    f"matches the pattern {p.source}, which this server's content filter does "
                    "not accept",
                )
        if self.hook is not None:
            try:
                reason = self.hook(text)
            except Exception as e:  # anything the operator's code raises
                raise HookFailed(f"{self.hook_name} raised {type(e).__name__}") from e
            if reason is None:
                return None
            if not isinstance(reason, str):
                raise HookFailed(
                    f"{self.hook_name} returned {type(reason).__name__}, not a str or None"
                )
            said = " ".join(reason.split()) or "no reason given"
            if len(said) > MAX_REASON_CHARS:
                said = said[: MAX_REASON_CHARS - 1] + "…"
            return "hook", f"was refused by this server's content filter: {said.rstrip('.')}"
        return None


def _compile_pattern(source: str, where: str, line: int) -> _Pattern:
    if not source:
        raise ValueError(f"{where}: 're:' has no pattern after it.")
    try:
        regex = re.compile(source, re.IGNORECASE)
    except re.error as e:
        at = f" at position {e.pos}" if e.pos is not None else ""
        raise ValueError(
            f"{where}: re:{source} is not a valid regular expression ({e.msg}{at})."
        ) from None
    except (OverflowError, RecursionError) as e:  # huge repeat counts, very deep nesting
        raise ValueError(f"{where}: re:{source} cannot be compiled ({e}).") from None
    if regex.search("") is not None:
        # It would refuse every turn, which is surely not what the operator meant.
        raise ValueError(f"{where}: re:{source} matches empty text, so it would refuse every turn.")
    return _Pattern(line, source, regex)


def _words_pattern(entries: list[str]) -> str:
    """One regex for every listed word and phrase, its alternatives merged on common prefixes.

    A flat alternation of 2,000 words costs every position of the text 2,000 failed attempts
    (a 100,000-character script of spaces took over a minute to search); merged into a trie,
    each position tries only the distinct characters that can come next, a few milliseconds for
    the same script. The pattern has no nested repetition, so its time is linear in the text.

    An entry is a whole word where it starts or ends with a word character: no word character
    may stand right before or after it there (`ass` is not found in `class`). An edge that is
    not a word character (`$$$`, `c++`) needs no boundary.
    """
    trie: _Trie = {}
    for entry in entries:
        node = trie
        for ch in entry:  # single spaces, as listed entries are normalised
            node = node.setdefault(ch, {})
        node[_END] = {}

    def below(node: _Trie, last: str) -> str:
        """The pattern for what may follow `last`, the character that led to `node`."""
        alternatives = [_piece(ch) + below(child, ch) for ch, child in sorted(node.items()) if ch]
        if _END in node:
            alternatives.append(r"(?!\w)" if _is_word_char(last) else "")
        if len(alternatives) == 1:
            return alternatives[0]
        return "(?:" + "|".join(alternatives) + ")"

    word_starts: list[str] = []
    other_starts: list[str] = []
    for ch, child in sorted(trie.items()):
        starts = word_starts if _is_word_char(ch) else other_starts
        starts.append(_piece(ch) + below(child, ch))
    # The boundary before an entry that starts with a word character is checked once per
    # position for all of them, not once per entry.
    branches = []
    if word_starts:
        branches.append(r"(?<!\w)(?:" + "|".join(word_starts) + ")")
    if other_starts:
        branches.append("(?:" + "|".join(other_starts) + ")")
    return "|".join(branches)


def _piece(ch: str) -> str:
    # A space in a listed phrase stands for any run of whitespace, line breaks included.
    return r"\s+" if ch == " " else re.escape(ch)


def _import_hook(spec: str) -> Hook:
    where = f"{HOOK_SETTING} = {spec!r}"
    module_name, colon, attr = (part.strip() for part in spec.partition(":"))
    if not colon or not module_name or not attr:
        raise ValueError(f"{where}: expected 'module:function', e.g. 'moderation.rules:check'.")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # importing runs the module's code, which may raise anything
        raise ValueError(
            f"{where}: cannot import module {module_name!r} ({type(e).__name__}: {e}); it must "
            "be importable by the server's Python (see PYTHONPATH)."
        ) from e
    target: object = module
    for name in attr.split("."):
        if not hasattr(target, name):
            raise ValueError(f"{where}: module {module_name!r} has no {attr!r}.")
        target = getattr(target, name)
    if not callable(target):
        raise ValueError(f"{where}: {attr!r} is a {type(target).__name__}, not a function.")
    try:
        inspect.signature(target).bind("text")
    except TypeError:
        raise ValueError(
            f"{where}: {attr!r} cannot be called with one argument; the hook is called as "
            f"{attr}(text) and returns a reason (str) to refuse it, or None."
        ) from None
    except ValueError:
        pass  # some built-in callables have no signature to check; calling them will tell
    return cast(Hook, target)
