"""Template text format (OpenPrompt's), parsed safely.

A template is plain text with ``{...}`` pieces, e.g.::

    {"placeholder":"text_a","shortenable":true} It was {"mask"}.

Each ``{...}`` is read with ``json.loads`` (never ``eval``). A bare key such as ``{"mask"}`` or
``{"soft"}`` is normalised to ``{"mask": null}`` first, and the Python literals ``True``/``False``/``None``
that OpenPrompt files often hold (they were eval'd there) are read as ``true``/``false``/``null``.
Braces inside JSON strings are fine.

Piece kinds (exactly one per piece):

    {"placeholder": "text_a"|"text_b"}   the example's text (shortenable by default)
    {"meta": "key"}                      example.meta[key] (shortenable by default)
    {"mask"}                             a mask slot; a template may hold several
    {"text": "words"}                    literal text (plain text between pieces is the same)
    {"special": "<sep>"}                 a special token (<cls> <sep> <eos> <bos> <pad> <unk> or literal)
    {"soft"} / {"soft": "It was"}        a learned vector; with text, one vector per token of the text,
                                         initialised from those tokens' embeddings

Options: ``shortenable`` (placeholder/meta: cut to fit max_length), ``post_processing`` (a name from
``POST_PROCESSING``, or the text of a common OpenPrompt lambda, which is recognised, never evaluated),
``soft_id`` (soft pieces with the same id share vectors; the first one defines them), ``duplicate``
(a random soft piece stands for n tokens), ``same`` (with duplicate: the n tokens share one vector),
``add_prefix_space`` ("" or " ": overrides the whitespace seen before the piece).

Whitespace: a piece remembers whether whitespace came right before it (``space_before``); text pieces
are stored without their outer whitespace. The template tokenises ``" " + text`` for such pieces, so
BPE tokenizers see the same word boundaries as in running text, and no stray space token is made
before a mask.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptdelta.errors import MissingFileError, PromptDeltaError, TemplateError

# Keys that pick what a piece is; exactly one per piece (``soft_id`` alone also means a soft piece).
KIND_KEYS = ("placeholder", "mask", "meta", "text", "soft", "special")
# Keys that modify a piece.
OPTION_KEYS = ("shortenable", "soft_id", "post_processing", "duplicate", "same", "add_prefix_space")
KNOWN_KEYS = KIND_KEYS + OPTION_KEYS
PLACEHOLDERS = ("text_a", "text_b")
SOFT_OPTIONS = ("soft_id", "duplicate", "same")
MAX_DUPLICATE = 4096          # soft tokens one piece may stand for: more than any backbone's positions we run

_FORMAT_HINT = 'e.g. {"placeholder":"text_a"} It was {"mask"}.'


def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _strip_period(s: str) -> str:
    return s.strip(".")


def _rstrip_period(s: str) -> str:
    return s.rstrip(".")


def _rstrip_punct(s: str) -> str:
    return s.rstrip(".!?,;: ")


def _add_period(s: str) -> str:
    s = s.rstrip()
    return s if not s or s[-1] in ".!?" else s + "."


# The safe, named text operations a {"post_processing": name} piece may ask for.
POST_PROCESSING: dict[str, Callable[[str], str]] = {
    "strip": str.strip,                 # outer whitespace
    "lower": str.lower,
    "upper": str.upper,
    "capitalize": str.capitalize,       # Python's: first letter upper, the rest lower
    "upper_first": _upper_first,        # "the cat" -> "The cat"
    "lower_first": _lower_first,        # "The cat" -> "the cat" (text that continues a sentence)
    "strip_period": _strip_period,      # OpenPrompt's common `lambda x: x.strip('.')`
    "rstrip_period": _rstrip_period,
    "rstrip_punct": _rstrip_punct,      # trailing . ! ? , ; : and spaces (a question put before "?")
    "add_period": _add_period,          # end with . unless it already ends with . ! or ?
}

# OpenPrompt lambda bodies (variable renamed to x, whitespace outside quotes removed, ' quotes) -> name.
_LAMBDA_ALIASES = {
    "x.strip()": "strip", "x.lower()": "lower", "x.upper()": "upper", "x.capitalize()": "capitalize",
    "x.strip('.')": "strip_period", "x.rstrip('.')": "rstrip_period",
    "x[0].upper()+x[1:]": "upper_first", "x[:1].upper()+x[1:]": "upper_first",
    "x[0].lower()+x[1:]": "lower_first", "x[:1].lower()+x[1:]": "lower_first",
}


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
        if piece.space_before is None:  # not fixed by the piece itself: whitespace before it decides
            piece.space_before = start > 0 and text[start - 1].isspace()
        pieces.append(piece)
        pos = end + 1
    if require_mask and not any(p.kind == "mask" for p in pieces):
        raise TemplateError(f'template {text!r} has no {{"mask"}} piece; add one where the label word '
                            f"should go, {_FORMAT_HINT}")
    return pieces


def canonical_post_processing(name: str) -> str:
    """The POST_PROCESSING name for a common OpenPrompt lambda text (never evaluated); else ``name``."""
    match = re.fullmatch(r"\s*lambda\s+(\w+)\s*:(.+)", name, flags=re.DOTALL)
    if match is None:
        return name
    var, body = match.groups()
    parts = re.split(r"('[^']*'|\"[^\"]*\")", body)
    norm = "".join(("'" + p[1:-1] + "'") if i % 2 else re.sub(rf"\b{var}\b", "x", re.sub(r"\s+", "", p))
                   for i, p in enumerate(parts))
    return _LAMBDA_ALIASES.get(norm, name)


def is_template_file(template: str | Path) -> bool:
    """Whether a template argument names a file rather than being template text.

    Template text always holds a ``{...}`` piece (at least the mask), a file name never does; so no file
    system call decides it (an inline template longer than a file name may be is no OSError), and a
    missing file is reported as missing, never parsed as text."""
    return isinstance(template, Path) or (isinstance(template, str) and "{" not in template)


def read_template_line(path: str | Path, choice: int = 0) -> str:
    """Template number ``choice`` of an OpenPrompt template file (one template per non-empty line)."""
    text = read_prompt_file(path, "template", TemplateError, "one template per line, OpenPrompt format, or "
                            'template text with a {"mask"} piece')
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise TemplateError(f"template file {str(path)!r} holds no template; write one template per line, "
                            f"{_FORMAT_HINT}")
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(lines):
        raise TemplateError(f"choice={choice!r} but {str(path)!r} has {len(lines)} template(s); pass "
                            f"choice in 0..{max(len(lines) - 1, 0)}")
    return lines[choice]


def read_prompt_file(path: str | Path, what: str, error: type[PromptDeltaError], fmt: str) -> str:
    """The text of a template/verbalizer file; MissingFileError when absent, ``error`` when not UTF-8."""
    path = Path(path)
    try:
        kind = "folder" if path.is_dir() else "file" if path.is_file() else None
        text = path.read_text(encoding="utf-8") if kind == "file" else ""
    except OSError as err:      # a name too long for the file system, a file we may not read
        raise MissingFileError(f"{what} file {_short(str(path))!r} cannot be read ({err.strerror or err}); "
                               f"check the path ({fmt})") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                    f"{err.start}); save it as UTF-8") from None
    if kind == "folder":
        raise error(f"{what} file {str(path)!r} is a folder; pass a file in it ({fmt})")
    if kind is None:
        raise MissingFileError(f"{what} file {_short(str(path))!r} does not exist; check the path ({fmt})")
    return text


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _outside_strings(text: str) -> Iterator[tuple[int, str]]:
    """(index, char) of every character outside double-quoted JSON strings (the quotes excluded)."""
    in_string, escaped = False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        else:
            yield i, ch


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
    depth = 0
    for i, ch in _outside_strings(text[start:]):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return start + i
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
    return _build_piece(kinds[0], data, f"in piece {raw} at column {column}", column)


def _load_json(raw: str, column: int) -> dict[str, Any]:
    """json.loads the piece; a bare key ("mask") becomes ("mask": null), True/False/None become JSON."""
    pythonic = _python_literals_to_json(raw)
    candidates = [raw, _normalise_bare_keys(raw)]
    if pythonic != raw:
        candidates += [pythonic, _normalise_bare_keys(pythonic)]
    first: json.JSONDecodeError | None = None
    for candidate in candidates:
        try:
            data = json.loads(candidate)
            break
        except json.JSONDecodeError as err:
            first = first or err  # positions in the rewritten texts would not match the template
    else:
        raise TemplateError(f"bad JSON in piece {raw} at column {column + first.pos}: {first.msg}; write "
                            f'each piece as JSON with double quotes, e.g. {{"placeholder":"text_a"}} '
                            f'or {{"mask"}}')
    if not isinstance(data, dict):
        raise TemplateError(f"piece {raw} at column {column} is not a JSON object; write it as "
                            f'{{"key": value}}, e.g. {{"meta":"entity"}}')
    return data


def _python_literals_to_json(raw: str) -> str:
    """'{"soft": None, "shortenable": True}' -> '{"soft": null, "shortenable": true}' (outside strings)."""
    code = {i for i, _ in _outside_strings(raw)}
    literals = {"True": "true", "False": "false", "None": "null"}
    out, last = [], 0
    for m in re.finditer(r"\b(True|False|None)\b", raw):
        if m.start() in code:
            out += [raw[last:m.start()], literals[m.group()]]
            last = m.end()
    return "".join(out) + raw[last:]


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
    items, depth, start = [], 0, 0
    for i, ch in _outside_strings(inner):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    return items


def _build_piece(kind: str, data: dict[str, Any], where: str, column: int) -> Piece:
    """Validate the values of one piece and build it."""
    value = _check_value(kind, data.get(kind), where)
    shortenable = data.get("shortenable", kind in ("placeholder", "meta"))
    if not isinstance(shortenable, bool):
        raise TemplateError(f"'shortenable' must be true or false {where}; write \"shortenable\": true")
    if shortenable and kind not in ("placeholder", "meta"):
        raise TemplateError(f"a {kind} piece cannot be shortenable {where}; only placeholder and meta "
                            f"pieces are cut to fit max_length, remove \"shortenable\"")
    post = data.get("post_processing")
    if post is not None and not isinstance(post, str):
        raise TemplateError(f"'post_processing' must be a string (a registered function name) {where}; "
                            f"use one of {', '.join(POST_PROCESSING)}")
    _check_soft_options(kind, value, data, where)
    space_before = _check_prefix_space(data, where)
    if kind == "text":
        space_before = True if value[:1].isspace() else space_before
        value = value.strip()
    return Piece(kind=kind, value=value, shortenable=shortenable, space_before=space_before,
                 post_processing=None if post is None else canonical_post_processing(post),
                 soft_id=data.get("soft_id"), duplicate=data.get("duplicate"), same=data.get("same"),
                 column=column)


def _check_value(kind: str, value: Any, where: str) -> Any:
    """The piece's value, checked for its kind (a blank soft init text counts as none)."""
    if kind == "placeholder" and value not in PLACEHOLDERS:
        raise TemplateError(f"placeholder {value!r} {where} is not one of {', '.join(PLACEHOLDERS)}; "
                            f'use {{"placeholder":"text_a"}} or {{"placeholder":"text_b"}}')
    if kind in ("meta", "text", "special") and not isinstance(value, str):
        raise TemplateError(f"{kind!r} needs a string value {where}; write e.g. "
                            f'{{"{kind}": "name"}}')
    if kind == "soft" and value is not None and not isinstance(value, str):
        raise TemplateError(f"'soft' takes a string (init words) or null {where}; write e.g. "
                            f'{{"soft": "It was"}} or {{"soft"}}')
    if kind == "soft" and value is not None and not value.strip():
        return None
    return value


def _check_soft_options(kind: str, value: Any, data: dict[str, Any], where: str) -> None:
    """soft_id / duplicate: positive ints on soft pieces; same: a bool that needs duplicate."""
    for key in SOFT_OPTIONS:
        if key in data and kind != "soft":
            raise TemplateError(f"{key!r} only applies to soft pieces {where}; remove it or make the "
                                f'piece soft, e.g. {{"soft": null, "{key}": ...}}')
    for key in ("soft_id", "duplicate"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise TemplateError(f"{key!r} must be a positive integer {where}, got {v!r}; write e.g. "
                                f'"{key}": 2')
    same, duplicate = data.get("same"), data.get("duplicate")
    if duplicate is not None and duplicate > MAX_DUPLICATE:
        raise TemplateError(f"'duplicate': {duplicate} {where} asks for more soft tokens than a prompt can hold "
                            f"(at most {MAX_DUPLICATE}, and fewer than max_length); use e.g. \"duplicate\": 20")
    if same is not None and not isinstance(same, bool):
        raise TemplateError(f"'same' must be true or false {where}; write \"same\": true")
    if same and duplicate is None:
        raise TemplateError(f"'same' repeats one soft vector 'duplicate' times {where}, but there is no "
                            f"'duplicate'; add e.g. \"duplicate\": 3 or remove \"same\"")
    if duplicate is not None and value is not None:
        raise TemplateError(f"'duplicate' makes n randomly initialised soft tokens {where}, but the piece "
                            f"already has init text (one token per word piece); remove 'duplicate' or "
                            f'write {{"soft": null, "duplicate": n}}')


def _check_prefix_space(data: dict[str, Any], where: str) -> bool | None:
    """add_prefix_space "" / " " -> False / True; None when absent (the template text decides)."""
    if "add_prefix_space" not in data:
        return None
    value = data["add_prefix_space"]
    if value not in ("", " ", True, False):
        raise TemplateError(f"'add_prefix_space' must be \"\" or \" \" {where}, got {value!r}; write "
                            f'"add_prefix_space": " "')
    return bool(value)
