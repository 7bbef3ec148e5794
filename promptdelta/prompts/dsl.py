"""Template text format (OpenPrompt's), parsed safely.

A template is plain text with ``{...}`` pieces, e.g.::

    {"placeholder":"text_a","shortenable":true} It was {"mask"}.

Each ``{...}`` is read with ``json.loads`` (never ``eval``). A bare key such as ``{"mask"}`` or
``{"soft"}`` is normalised to ``{"mask": null}`` first. Braces inside JSON strings are fine.

Whitespace: a piece remembers whether whitespace came right before it (``space_before``); text pieces
are stored without their outer whitespace. The template tokenises ``" " + text`` for such pieces, so
BPE tokenizers see the same word boundaries as in running text, and no stray space token is made
before a mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from promptdelta.errors import TemplateError

# Keys that pick what a piece is; exactly one per piece (``soft_id`` alone also means a soft piece).
KIND_KEYS = ("placeholder", "mask", "meta", "text", "soft", "special")
# Keys that modify a piece.
OPTION_KEYS = ("shortenable", "soft_id", "post_processing", "duplicate", "same")
KNOWN_KEYS = KIND_KEYS + OPTION_KEYS
PLACEHOLDERS = ("text_a", "text_b")

_FORMAT_HINT = 'e.g. {"placeholder":"text_a"} It was {"mask"}.'


@dataclass
class Piece:
    """One piece of a template.

    kind: "text" | "placeholder" | "mask" | "meta" | "soft" | "special"
    value: the literal text, the placeholder name ("text_a"/"text_b"), the meta key, the soft init
    text or the special token; None for a mask or an uninitialised soft token.
    """

    kind: str
    value: str | None = None
    shortenable: bool = False
    space_before: bool = False
    post_processing: str | None = None
    soft_id: int | None = None
    duplicate: int | None = None
    same: Any = None
    column: int = 1                       # 1-based column of the piece in the template text


def parse_template(text: str, require_mask: bool = True) -> list[Piece]:
    """Parse a template text into pieces. Raises TemplateError with the column and a fix."""
    if not isinstance(text, str):
        raise TemplateError(f"a template must be a str, got {type(text).__name__}; pass the template "
                            f"text, {_FORMAT_HINT}")
    pieces: list[Piece] = []
    pos = 0
    while pos < len(text):
        start = _next_brace(text, pos)
        _add_text(pieces, text[pos:start], pos)
        if start == len(text):
            break
        end = _matching_brace(text, start)
        piece = _parse_braced(text[start:end + 1], start + 1)
        piece.space_before |= start > 0 and text[start - 1].isspace()
        pieces.append(piece)
        pos = end + 1
    if require_mask and not any(p.kind == "mask" for p in pieces):
        raise TemplateError(f'template {text!r} has no {{"mask"}} piece; add one where the label word '
                            f"should go, {_FORMAT_HINT}")
    return pieces


def _next_brace(text: str, pos: int) -> int:
    """Index of the next '{' at or after pos (len(text) when none); a stray '}' is an error."""
    for i in range(pos, len(text)):
        if text[i] == "{":
            return i
        if text[i] == "}":
            raise TemplateError(f"unbalanced brace: '}}' at column {i + 1} has no opening '{{' in "
                                f"{text!r}; remove it or open the piece with '{{'")
    return len(text)


def _matching_brace(text: str, start: int) -> int:
    """Index of the '}' closing the '{' at start, skipping braces inside JSON strings."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    raise TemplateError(f"unbalanced brace: '{{' at column {start + 1} is never closed in {text!r}; "
                        f"close the piece with '}}' (and close any open '\"')")


def _add_text(pieces: list[Piece], chunk: str, pos: int) -> None:
    """Append a plain-text piece for chunk (outer whitespace becomes space_before / the next piece's)."""
    stripped = chunk.strip()
    if stripped:
        lead = len(chunk) - len(chunk.lstrip())
        pieces.append(Piece(kind="text", value=stripped, space_before=lead > 0, column=pos + lead + 1))


def _parse_braced(raw: str, column: int) -> Piece:
    """Parse one '{...}' piece (raw includes the braces) at the given 1-based column."""
    data = _load_json(raw, column)
    unknown = [k for k in data if k not in KNOWN_KEYS]
    if unknown:
        raise TemplateError(f"unknown key {unknown[0]!r} in piece {raw} at column {column}; known keys are "
                            f"{', '.join(KNOWN_KEYS)}")
    kinds = [k for k in KIND_KEYS if k in data]
    if not kinds and "soft_id" in data:
        kinds = ["soft"]
    if len(kinds) != 1:
        found = "none" if not kinds else ", ".join(kinds)
        raise TemplateError(f"piece {raw} at column {column} must have exactly one of "
                            f"{', '.join(KIND_KEYS)} (found {found}); split it into separate pieces")
    return _build_piece(kinds[0], data, raw, column)


def _load_json(raw: str, column: int) -> dict[str, Any]:
    """json.loads the piece; a bare key ("mask") becomes ("mask": null)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as first:
        try:
            data = json.loads(_normalise_bare_keys(raw))
        except json.JSONDecodeError:
            err = first  # positions in the normalised text would not match the template
            raise TemplateError(f"bad JSON in piece {raw} at column {column + err.pos}: {err.msg}; write "
                                f'each piece as JSON with double quotes, e.g. {{"placeholder":"text_a"}} '
                                f'or {{"mask"}}') from None
    if not isinstance(data, dict):
        raise TemplateError(f"piece {raw} at column {column} is not a JSON object; write it as "
                            f'{{"key": value}}, e.g. {{"meta":"entity"}}')
    return data


def _normalise_bare_keys(raw: str) -> str:
    """'{"mask", "shortenable": false}' -> '{"mask": null, "shortenable": false}'."""
    items = _split_top_level(raw[1:-1])
    fixed = []
    for item in items:
        try:
            bare = isinstance(json.loads(item), str)
        except json.JSONDecodeError:
            bare = False
        fixed.append(f"{item.strip()}: null" if bare else item)
    return "{" + ",".join(fixed) + "}"


def _split_top_level(inner: str) -> list[str]:
    """Split on commas that are outside strings, brackets and braces."""
    items, depth, in_string, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(inner):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return items


def _build_piece(kind: str, data: dict[str, Any], raw: str, column: int) -> Piece:
    """Validate the values of one piece and build it."""
    value = data.get(kind)
    where = f"in piece {raw} at column {column}"
    if kind == "placeholder" and value not in PLACEHOLDERS:
        raise TemplateError(f"placeholder {value!r} {where} is not one of {', '.join(PLACEHOLDERS)}; "
                            f'use {{"placeholder":"text_a"}} or {{"placeholder":"text_b"}}')
    if kind in ("meta", "text", "special") and not isinstance(value, str):
        raise TemplateError(f"{kind!r} needs a string value {where}; write e.g. "
                            f'{{"{kind}": "name"}}')
    if kind == "soft" and value is not None and not isinstance(value, str):
        raise TemplateError(f"'soft' takes a string (init words) or null {where}; write e.g. "
                            f'{{"soft": "It was"}} or {{"soft"}}')
    shortenable = data.get("shortenable", kind in ("placeholder", "meta"))
    if not isinstance(shortenable, bool):
        raise TemplateError(f"'shortenable' must be true or false {where}; write \"shortenable\": true")
    if shortenable and kind not in ("placeholder", "meta"):
        raise TemplateError(f"a {kind} piece cannot be shortenable {where}; only placeholder and meta "
                            f"pieces are cut to fit max_length, remove \"shortenable\"")
    post = data.get("post_processing")
    if post is not None and not isinstance(post, str):
        raise TemplateError(f"'post_processing' must be a string (a registered function name) {where}")
    space_before = kind == "text" and value[:1].isspace()
    if kind == "text":
        value = value.strip()
    return Piece(kind=kind, value=value, shortenable=shortenable, space_before=space_before,
                 post_processing=post,
                 soft_id=data.get("soft_id"), duplicate=data.get("duplicate"), same=data.get("same"),
                 column=column)
