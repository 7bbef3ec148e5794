"""The template text parser: every piece kind, whitespace bookkeeping, and every error with its column."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from promptdelta.errors import TemplateError
from promptdelta.prompts import parse_template
from promptdelta.prompts.dsl import KNOWN_KEYS


def kinds(pieces):
    return [(p.kind, p.value) for p in pieces]


def test_basic_template_pieces():
    pieces = parse_template('{"placeholder":"text_a"} It was {"mask"}.')
    assert kinds(pieces) == [("placeholder", "text_a"), ("text", "It was"), ("mask", None), ("text", ".")]
    assert [p.space_before for p in pieces] == [False, True, True, False]
    assert [p.shortenable for p in pieces] == [True, False, False, False]
    assert [p.column for p in pieces] == [1, 26, 33, 41]


def test_every_piece_kind_and_options():
    text = ('{"placeholder":"text_a","shortenable":false} {"placeholder":"text_b"} {"meta":"entity"} '
            '{"text":"is a"} {"special":"[SEP]"} {"soft"} {"soft_id": 3} {"mask", "post_processing": "lower"}')
    pieces = parse_template(text)
    assert kinds(pieces) == [("placeholder", "text_a"), ("placeholder", "text_b"), ("meta", "entity"),
                             ("text", "is a"), ("special", "[SEP]"), ("soft", None), ("soft", None),
                             ("mask", None)]
    assert [p.shortenable for p in pieces] == [False, True, True, False, False, False, False, False]
    assert pieces[6].soft_id == 3
    assert pieces[7].post_processing == "lower"
    assert all(p.space_before for p in pieces[1:])


def test_nested_braces_and_escapes_inside_json_strings():
    pieces = parse_template(r'{"text": "a {b} \"}\" c"} {"mask"} {"meta": "x}{y"}')
    assert kinds(pieces) == [("text", 'a {b} "}" c'), ("mask", None), ("meta", "x}{y")]


def test_whitespace_only_text_between_pieces_becomes_space_before():
    pieces = parse_template('{"placeholder":"text_a"}   {"mask"}')
    assert kinds(pieces) == [("placeholder", "text_a"), ("mask", None)]
    assert pieces[1].space_before


def test_require_mask_can_be_turned_off():
    pieces = parse_template('{"placeholder":"text_a"} end', require_mask=False)
    assert kinds(pieces) == [("placeholder", "text_a"), ("text", "end")]


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1).filter(lambda s: s.strip()))
def test_any_string_survives_as_a_json_text_value(value):
    pieces = parse_template('{"text": ' + json.dumps(value) + '} {"mask"}')
    assert pieces[0].kind == "text" and pieces[0].value == value.strip()
    assert pieces[1].kind == "mask"


@pytest.mark.parametrize("text, column, fix", [
    ('{"placeholder":"text_a"} It was {"mask"', "column 33", "close the piece"),
    ('It was } {"mask"}', "column 8", "remove it"),
    ('{"mask": } x', "column 10", "double quotes"),
    ("{'mask'} x", "column 2", "double quotes"),
    ('{"placeholder":"text_a","colour":1} {"mask"}', "column 1", "known keys are"),
    ('{"placeholder":"text_c"} {"mask"}', "column 1", '{"placeholder":"text_b"}'),
    ('x {"mask", "text": "y"}', "column 3", "split it"),
    ('{"mask"} {"meta": 5}', "column 10", "string value"),
    ('{"mask", "shortenable": true}', "column 1", 'remove "shortenable"'),
    ('{"placeholder":"text_a", "shortenable": "yes"} {"mask"}', "column 1", "true or false"),
    ('{"placeholder":"text_a"} x {"shortenable": true}', "column 28", "exactly one of"),
])
def test_errors_name_the_column_and_the_fix(text, column, fix):
    with pytest.raises(TemplateError) as err:
        parse_template(text)
    assert column in str(err.value)
    assert fix in str(err.value)


def test_unknown_key_lists_every_known_key():
    with pytest.raises(TemplateError) as err:
        parse_template('{"mask"} {"colour": 1}')
    for key in KNOWN_KEYS:
        assert key in str(err.value)


def test_no_mask_is_an_error_with_an_example_of_the_fix():
    with pytest.raises(TemplateError, match=r'has no \{"mask"\} piece; add one'):
        parse_template('{"placeholder":"text_a"} It was great.')


def test_non_string_template_is_rejected():
    with pytest.raises(TemplateError, match="must be a str"):
        parse_template(None)
