"""A cheap look at raw SQL text: how many statements it holds and whether it controls the transaction.

A raw SQL step runs inside the PostgreSQL consumer's batch transaction, next to other sagas' effects and
their markers. A `COMMIT`, `ROLLBACK` or `PREPARE TRANSACTION` there would commit or drop those effects
apart from their markers, so such steps are refused when the operation is parsed. This is a tokenizer,
not a parser: it skips string literals, quoted identifiers, dollar-quoted bodies and comments, and reads
the first words of each statement. (The consumer checks again at run time that its transaction is
still open after each raw step.)
"""

from __future__ import annotations

import re

# First words that begin, end or reshape a transaction (or a savepoint) when they open a statement.
_CONTROL_WORDS = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"})
_CONTROL_PREFIXES = (("PREPARE", "TRANSACTION"), ("SET", "TRANSACTION"), ("SET", "SESSION", "CHARACTERISTICS"))
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_WORD = re.compile(r"[A-Za-z_]+")


def _skip_quoted(text: str, i: int, quote: str, backslashes: bool) -> int:
    """The index after a literal opened at `text[i]`; a doubled quote (or \\x in E'') stays inside it."""
    i += 1
    while i < len(text):
        if backslashes and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if i + 1 < len(text) and text[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return i


def _skip_block_comment(text: str, i: int) -> int:
    depth, i = 1, i + 2  # PostgreSQL block comments nest
    while i < len(text) and depth:
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _skip(text: str, i: int) -> int | None:
    """Where a literal, quoted identifier or comment starting at `i` ends; None when none starts there."""
    c = text[i]
    if c == "'":
        escaped = i > 0 and text[i - 1] in "eE" and (i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
        return _skip_quoted(text, i, "'", escaped)
    if c == '"':
        return _skip_quoted(text, i, '"', False)
    if text.startswith("--", i):
        end = text.find("\n", i)
        return len(text) if end < 0 else end
    if text.startswith("/*", i):
        return _skip_block_comment(text, i)
    if c == "$" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
        tag = _DOLLAR_TAG.match(text, i)
        if tag is not None:
            end = text.find(tag.group(0), tag.end())
            return len(text) if end < 0 else end + len(tag.group(0))
    return None


def statements(text: str) -> list[str]:
    """The statements of `text` as their code outside literals and comments (each blanked to a space),
    split at top-level semicolons; empty statements are dropped."""
    found: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        end = _skip(text, i)
        if end is not None:
            current.append(" ")
            i = end
            continue
        if text[i] == ";":
            found.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    found.append("".join(current))
    return [s for s in found if s.strip()]


def transaction_control(text: str) -> str | None:
    """Why a raw SQL step may not run inside a shared transaction, or None when it may."""
    found = statements(text)
    if len(found) > 1:
        return f"a raw SQL step holds one statement; this one has {len(found)}"
    words = tuple(w.upper() for w in _WORD.findall(found[0])[:3]) if found else ()
    if words and (words[0] in _CONTROL_WORDS or any(words[: len(p)] == p for p in _CONTROL_PREFIXES)):
        return f"{' '.join(words)} would control the consumer's shared transaction"
    return None
