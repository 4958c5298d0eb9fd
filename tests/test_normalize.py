"""Tests for the pure ETL step upsertflow.normalize."""

import math
import sys
import unicodedata
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upsertflow.normalize import (
    MAX_COLLISION_SOURCES,
    MAX_COLLISIONS,
    Collision,
    JsonScalar,
    Normalized,
    coerce_value,
    normalize_info,
    normalize_key,
)

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)


def typed(records: dict[str, JsonScalar]) -> list[tuple[str, type[Any], JsonScalar]]:
    """Records with value types, so that 1 == 1.0 == True do not hide a wrong coercion."""
    return [(key, type(value), value) for key, value in records.items()]


# --- rule 1: flattening -------------------------------------------------------------------------


def test_example_from_the_spec() -> None:
    result = normalize_info(
        {"Address": {"City": " Paris "}, "Age": "42", "Active": "yes", "Empty": ""}
    )
    assert typed(result.records) == [
        ("address.city", str, "Paris"),
        ("age", int, 42),
        ("active", bool, True),
    ]
    assert result.dropped == ("Empty",)
    assert result.collisions == ()


def test_nested_objects_and_lists_flatten_to_dotted_paths() -> None:
    result = normalize_info(
        {
            "address": {"city": "Paris", "geo": {"lat": 48.85}},
            "tags": ["a", "b"],
            "matrix": [[1, 2], [{"Deep Key": "x"}]],
        }
    )
    assert result.records == {
        "address.city": "Paris",
        "address.geo.lat": 48.85,
        "tags.0": "a",
        "tags.1": "b",
        "matrix.0.0": 1,
        "matrix.0.1": 2,
        "matrix.1.0.deep_key": "x",
    }


def test_records_follow_input_order() -> None:
    result = normalize_info({"z": 1, "a": {"y": 2, "b": 3}, "m": [4, 5], "c": 6})
    assert list(result.records) == ["z", "a.y", "a.b", "m.0", "m.1", "c"]


def test_dotted_raw_key_is_the_same_as_nesting() -> None:
    assert normalize_info({"a.b": 1}) == normalize_info({"a": {"b": 1}})
    assert normalize_info({"Address.City": "Paris"}).records == {"address.city": "Paris"}


def test_empty_segments_are_left_out_of_the_path() -> None:
    result = normalize_info(
        {
            "a..b": 1,
            ".x": 2,
            "y.": 3,
            "Invoice No.": 4,
            "p": {"": 5, "q": {"  ": {"r": 6}}, "!!!": {"s": 7}},
            "": 8,
        }
    )
    assert result.records == {
        "a.b": 1,
        "x": 2,
        "y": 3,
        "invoice_no": 4,
        "p": 5,
        "p.q.r": 6,
        "p.s": 7,
        "_": 8,
    }


def test_an_empty_key_equals_its_nesting() -> None:
    assert normalize_info({"a.": 1}) == normalize_info({"a": {"": 1}})
    assert normalize_info({"a..b": 1}) == normalize_info({"a": {"": {"b": 1}}})
    assert normalize_info({".": 1}) == normalize_info({"": {"": 1}})


@pytest.mark.parametrize("key", ["", "   ", ".", "..", " . ", "_", "__", "!!!", "\u3000", "._."])
def test_a_key_with_no_segment_left_is_underscore(key: str) -> None:
    assert normalize_key(key) == "_"
    assert normalize_info({key: 1}).records == {"_": 1}
    assert normalize_info({"a": {key: 1}}).records == {"a": 1}


def test_normalize_is_idempotent_on_its_own_output() -> None:
    first = normalize_info({"First Name": " Ada ", "Tags": ["x", "007"], "When": "2024-01-05"})
    second = normalize_info(first.records)
    assert typed(second.records) == typed(first.records)
    assert second.dropped == () and second.collisions == ()


def test_deep_nesting_does_not_hit_the_recursion_limit() -> None:
    depth = sys.getrecursionlimit() + 1000
    info: dict[str, Any] = {"Leaf": "v"}
    for _ in range(depth):
        info = {"Level": info}
    result = normalize_info(info)
    assert result.records == {"level." * depth + "leaf": "v"}


# --- rule 2: keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("firstName", "first_name"),
        ("FirstName", "first_name"),
        ("HTTPServer", "http_server"),
        ("Address", "address"),
        ("userID", "user_id"),
        ("version2Name", "version2_name"),
        ("first_name", "first_name"),
        ("First Name", "first_name"),
        ("  first name  ", "first_name"),
        ("e-mail", "e_mail"),
        ("a / b (c)", "a_b_c"),
        ("a__b", "a_b"),
        ("__private__", "private"),
        ("ALLCAPS", "allcaps"),
        ("", "_"),
        ("   ", "_"),
        ("!!!", "_"),
        ("_", "_"),
        ("0", "0"),
        ("12", "12"),
        ("007", "007"),
        ("Straße", "straße"),
        ("ÉcoleName", "école_name"),
        ("ÄÖÜ", "äöü"),
        ("名前", "名前"),
    ],
)
def test_normalize_key(raw: str, expected: str) -> None:
    assert normalize_key(raw) == expected
    assert normalize_key(expected) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cafe\u0301", "café"),  # decomposed (NFD)
        ("caf\u00e9", "café"),  # composed (NFC)
        ("CAFE\u0301", "café"),
        ("Cafe\u0301Name", "café_name"),
        ("\uff2e\uff41\uff4d\uff45", "name"),  # full-width Ｎａｍｅ
        ("\ufb01eld", "field"),  # ligature ﬁ
        ("x\u00b2", "x2"),  # superscript two
        ("a\u00a0b", "a_b"),  # no-break space
        ("\u210cello", "hello"),  # ℌ
        ("\uff21ddress\uff0e\uff23ity", "address.city"),  # full-width dot is a dot
        ("हिन्दी", "हिन्दी"),  # combining vowel signs are kept
        ("q\u0301Name", "q\u0301_name"),  # no precomposed form: the mark is kept
        ("\u0130\u0316", "i\u0316\u0307"),  # lowercasing İ undoes NFKC: normalized again
        ("a-\u0301-b", "a_b"),  # a mark after punctuation is punctuation
        ("Address.City", "address.city"),
        ("a..b", "a.b"),
        ("Invoice No.", "invoice_no"),
    ],
)
def test_normalize_key_unicode_and_dots(raw: str, expected: str) -> None:
    assert normalize_key(raw) == expected
    assert normalize_key(expected) == expected
    assert normalize_info({raw: 1}).records == {expected: 1}


def test_composed_and_decomposed_keys_are_the_same_key() -> None:
    result = normalize_info({"Caf\u00e9": "first", "cafe\u0301": "second", "CAFÉ": {}})
    assert result.records == {"café": "first"}
    assert result.lost == 1
    assert result.collisions == (Collision(path="café", sources=("Caf\u00e9", "cafe\u0301")),)


# --- rule 3: values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # booleans, any case, trimmed
        ("true", True),
        ("Yes", True),
        (" y ", True),
        ("ON", True),
        ("false", False),
        ("No", False),
        ("N", False),
        ("off", False),
        # numbers
        ("42", 42),
        (" 42 ", 42),
        ("-3.5", -3.5),
        ("+5", 5),
        ("0", 0),
        ("-0", 0),
        ("0.5", 0.5),
        ("1.0", 1.0),
        ("1e3", 1000.0),
        ("2E-2", 0.02),
        ("20240105", 20240105),
        (str(2**53), 2**53),
        (str(-(2**53)), -(2**53)),
        # kept as strings
        ("007", "007"),
        ("01234", "01234"),
        ("00.5", "00.5"),
        ("-007", "-007"),
        (str(2**53 + 1), str(2**53 + 1)),
        ("1" * 5000, "1" * 5000),
        ("1e999", "1e999"),
        ("-1e999", "-1e999"),
        (".5", ".5"),
        ("1.", "1."),
        ("1_000", "1_000"),
        ("1,000", "1,000"),
        ("0x1F", "0x1F"),
        ("inf", "inf"),
        ("NaN", "NaN"),
        ("١٢٣", "١٢٣"),
        ("+", "+"),
        ("  hello world ", "hello world"),
        ("yes please", "yes please"),
        # dates and datetimes
        ("2024-01-05", "2024-01-05"),
        (" 2024-01-05 ", "2024-01-05"),
        ("2024-01-05T10:00:00+02:00", "2024-01-05T08:00:00Z"),
        ("2024-01-05T01:00:00-05:30", "2024-01-05T06:30:00Z"),
        ("2024-01-05T00:30:00+01:00", "2024-01-04T23:30:00Z"),
        ("2024-01-05T10:00:00Z", "2024-01-05T10:00:00Z"),
        ("2024-01-05T10:00:00.250+00:00", "2024-01-05T10:00:00.250000Z"),
        ("2024-01-05T10:00", "2024-01-05T10:00:00"),
        ("2024-01-05 10:00:00", "2024-01-05T10:00:00"),
        ("2024-13-01", "2024-13-01"),
        ("2024-02-30", "2024-02-30"),
        ("2024-01-05 and more", "2024-01-05 and more"),
        ("9999-12-31T23:00:00-05:00", "9999-12-31T23:00:00-05:00"),
        ("05/01/2024", "05/01/2024"),
    ],
)
def test_coerce_value(raw: str, expected: JsonScalar) -> None:
    result = coerce_value(raw)
    assert type(result) is type(expected)
    assert result == expected
    if isinstance(result, str):
        assert coerce_value(result) == result


@pytest.mark.parametrize("value", [True, False, 0, 1, -(2**53), 1.5, -0.0, 1e300])
def test_non_string_scalars_are_kept_as_they_are(value: JsonScalar) -> None:
    result = normalize_info({"v": value})
    assert typed(result.records) == [("v", type(value), value)]


# --- rule 4: dropping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "empty", [None, "", "   ", "N/A", "n/a", "NA", "na", "null", "NULL", "none", "None", "-", " - "]
)
def test_empty_values_are_dropped(empty: str | None) -> None:
    if empty is not None:
        assert coerce_value(empty) is None
    result = normalize_info({"Keep": 1, "Outer Key": {"list": ["x", empty]}})
    assert result.records == {"keep": 1, "outer_key.list.0": "x"}
    assert result.dropped == ("Outer Key.list.1",)


def test_dropped_lists_raw_paths_in_input_order() -> None:
    result = normalize_info({"B": None, "a": {"X Y": ""}, "c": ["n/a", 1]})
    assert result.dropped == ("B", "a.X Y", "c.0")


def test_empty_containers_produce_nothing() -> None:
    result = normalize_info({"obj": {}, "list": [], "nested": {"a": [{}, []]}})
    assert result == Normalized(records={}, dropped=(), collisions=())
    assert normalize_info({}) == Normalized(records={}, dropped=(), collisions=())


# --- rule 5: collisions -------------------------------------------------------------------------


def test_collision_keeps_the_first_and_lists_all_sources() -> None:
    result = normalize_info({"First Name": "Ada", "first_name": "Bob", "firstName": "Cy"})
    assert result.records == {"first_name": "Ada"}
    assert result.collisions == (
        Collision(path="first_name", sources=("First Name", "first_name", "firstName")),
    )


def test_collisions_in_nested_paths_and_order_of_detection() -> None:
    result = normalize_info({"B": 1, "A": {"x": 1}, "a": {"X": 2}, "b": 2})
    assert result.records == {"b": 1, "a.x": 1}
    assert result.collisions == (
        Collision(path="a.x", sources=("A.x", "a.X")),
        Collision(path="b", sources=("B", "b")),
    )


def test_dotted_key_collides_with_nested_key() -> None:
    result = normalize_info({"a": {"b": 1}, "A.B": 2})
    assert result.records == {"a.b": 1}
    assert result.collisions == (Collision(path="a.b", sources=("a.b", "A.B")),)


def test_collisions_from_the_issue() -> None:
    info = {"Foo Bar": 1, "foo_bar": 2, "FooBar": 3, "foo-bar": 4, " foo bar ": 5}
    result = normalize_info({**info, "a.b": 6, "a": {"b": 7}})
    assert result.records == {"foo_bar": 1, "a.b": 6}
    assert result.lost == 5
    assert result.collided_paths == 2
    assert result.collisions == (
        Collision(path="foo_bar", sources=("Foo Bar", "foo_bar", "FooBar", "foo-bar", " foo bar ")),
        Collision(path="a.b", sources=("a.b", "a.b")),
    )
    assert [c.lost for c in result.collisions] == [4, 1]
    assert len(result.records) + result.lost + len(result.dropped) == 7


@pytest.mark.parametrize(
    ("info", "winner"),
    [
        ({"a.b": 1, "a": {"b": 2}}, 1),
        ({"a": {"b": 2}, "a.b": 1}, 2),
        ({"A": {"B": 1}, "a": {"b": 2}, "a.b": 3}, 1),
        ({"a": [{"b": 1}], "a.0.b": 2, "a.0": {"b": 3}}, 1),
        ({"x": {"a.b": 1}, "x.a": {"b": 2}}, 1),
        ({"a": {"": 1}, "a.": 2, "A": 3}, 1),
    ],
)
def test_first_leaf_in_input_order_wins_whatever_its_form(
    info: dict[str, Any], winner: int
) -> None:
    result = normalize_info(info)
    assert list(result.records.values()) == [winner]
    assert result.lost == len(leaves(info)) - 1
    assert result.collided_paths == 1


def test_collision_details_are_bounded_and_the_counts_exact() -> None:
    parent = "P" * 1000
    many = {" " * i + "Key": i for i in range(3000)}  # 3000 spellings of one key
    pairs = {f"{prefix}{i}": i for i in range(250) for prefix in ("K", "k")}
    result = normalize_info({parent: many, **pairs})
    assert len(result.records) == 1 + 250
    assert result.records["p" * 1000 + ".key"] == 0
    assert result.lost == 2999 + 250
    assert result.collided_paths == 1 + 250
    assert len(result.collisions) == MAX_COLLISIONS == 100
    first = result.collisions[0]
    assert first.path == "p" * 1000 + ".key"
    assert first.sources == tuple(f"{parent}.{' ' * i}Key" for i in range(MAX_COLLISION_SOURCES))
    assert first.lost == 2999
    assert [c.path for c in result.collisions[1:]] == [f"k{i}" for i in range(99)]
    assert all(
        c.sources == (f"K{i}", f"k{i}") and c.lost == 1 for i, c in enumerate(result.collisions[1:])
    )
    assert len(result.records) + result.lost + len(result.dropped) == 3000 + 500


def test_dropped_values_do_not_claim_a_path() -> None:
    result = normalize_info({"First Name": "", "first_name": "Bob"})
    assert result.records == {"first_name": "Bob"}
    assert result.dropped == ("First Name",)
    assert result.collisions == ()


def test_output_is_deterministic() -> None:
    info = {"X": [1, {"y": "2"}], "x": {"0": "dup"}, "Z": None}
    assert normalize_info(info) == normalize_info(info)


# --- input validation ---------------------------------------------------------------------------


def test_rejects_non_json_input() -> None:
    with pytest.raises(TypeError):
        normalize_info({"a": {1: "x"}})
    with pytest.raises(TypeError):
        normalize_info({"a": {1, 2}})
    with pytest.raises(ValueError):
        normalize_info({"a": [math.nan]})
    with pytest.raises(TypeError):
        normalize_info([1, 2])  # type: ignore[arg-type]


# --- size -----------------------------------------------------------------------------------------


def test_100k_leaf_map() -> None:
    values: list[Any] = [" 42 ", "yes", "N/A", "2024-01-05T10:00:00+02:00", "007", 3.5, None, "x"]
    info = {
        f"Section{s}": {f"fieldName{f}": values[f % len(values)] for f in range(100)}
        for s in range(1000)
    }
    result = normalize_info(info)
    assert len(result.records) == 75_000
    assert len(result.dropped) == 25_000
    assert result.collisions == ()
    assert result.records["section0.field_name0"] == 42
    assert result.records["section999.field_name99"] == "2024-01-05T08:00:00Z"
    assert result.records["section500.field_name4"] == "007"
    assert result.dropped[:2] == ("Section0.fieldName2", "Section0.fieldName6")
    assert len(normalize_info({f"k{i}": i for i in range(100_000)}).records) == 100_000


# --- properties ---------------------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(
        [
            *("First Name", "first_name", "firstName", "HTTPServer", "Address", "a.b", "a", "b"),
            *("A", " City ", "", ".", "x..y", "tags", "0", "1", "e-mail", "ÉcoleName", "İd"),
            *("a.", ".a", "_", "  ", "Invoice No.", "\uff41", "a\uff0eb", "\ufb01", "x\u00b2"),
            *("caf\u00e9", "cafe\u0301", "CAFE\u0301", "\u0301", "q\u0301", "हिन्दी"),
            "\u0130\u0316",  # lowercase is not NFKC without a second pass
            "\u2102x",  # upper case without a lower case form
        ]
    ),
    st.text(st.sampled_from("aAbB zZ_-.0é\u0301\u0308\uff0e\u3000İß"), max_size=6),
    st.text(max_size=4),
)

TIMEZONES = st.none() | st.builds(
    timezone, st.timedeltas(min_value=-timedelta(hours=23), max_value=timedelta(hours=23))
)
DATE_STRINGS = st.one_of(
    st.dates().map(date.isoformat),
    st.datetimes(timezones=TIMEZONES).map(datetime.isoformat),
    st.datetimes(timezones=TIMEZONES).map(lambda d: d.isoformat(sep=" ")),
    st.sampled_from(["2024-13-01", "2024-01-05T25:00", "2024-01-05T10:00:00Z", "2024-01-05x"]),
)
NUMERIC_STRINGS = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False).map(repr),
    st.sampled_from(["007", "01234", "-0", "+5", "1e3", "1e999", ".5", "00", "1_000"]),
)
SPECIAL_STRINGS = st.sampled_from(
    ["", " ", "N/A", "n/a", "NA", "null", "NONE", "-", "yes", "No", "ON", "off", "y", "N"]
)
STRINGS = st.one_of(SPECIAL_STRINGS, NUMERIC_STRINGS, DATE_STRINGS, st.text(max_size=8)).flatmap(
    lambda s: st.sampled_from([s, f" {s} ", f"\t{s}"])
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    STRINGS,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=25,
)
JSON_OBJECTS = st.dictionaries(KEYS, JSON_VALUES, max_size=6)
# Anything json.loads can return as an object: any keys, any ints, any strings.
ANY_JSON_OBJECTS = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=25,
    ),
    max_size=6,
)


def leaves(node: Any, raw: str = "", norm: tuple[str, ...] = ()) -> list[tuple[str, str, Any]]:
    """(raw dotted path, normalized dotted path, value) of every leaf, in input order.

    An independent statement of rules 1 and 2c: the path is the normalized segments of
    all the keys on the way, empty ones ("_") left out, or "_" if none is left.
    """
    if isinstance(node, dict):
        pairs = list(node.items())
    elif isinstance(node, list):
        pairs = [(str(index), item) for index, item in enumerate(node)]
    else:
        return [(raw[:-1], ".".join(norm) or "_", node)]
    found: list[tuple[str, str, Any]] = []
    for key, value in pairs:
        segments = tuple(s for s in normalize_key(key).split(".") if s != "_")
        found += leaves(value, f"{raw}{key}.", norm + segments)
    return found


def expected_value(value: Any) -> JsonScalar | None:
    return coerce_value(value) if isinstance(value, str) else value


def assert_every_leaf_accounted_for(info: dict[str, Any], result: Normalized) -> None:
    assert len(result.records) + result.lost + len(result.dropped) == len(leaves(info))
    assert result.collided_paths >= len(result.collisions)
    assert len(result.collisions) <= MAX_COLLISIONS
    assert all(2 <= len(c.sources) <= MAX_COLLISION_SOURCES for c in result.collisions)
    if result.collided_paths == len(result.collisions):
        assert result.lost == sum(c.lost for c in result.collisions)


@PROPERTY_SETTINGS
@given(JSON_OBJECTS)
def test_property_idempotent(info: dict[str, Any]) -> None:
    first = normalize_info(info)
    second = normalize_info(first.records)
    assert typed(second.records) == typed(first.records)
    assert second.dropped == ()
    assert second.collisions == ()
    assert second.lost == second.collided_paths == 0
    assert normalize_info(info) == first  # deterministic


@PROPERTY_SETTINGS
@given(JSON_OBJECTS)
def test_property_every_leaf_is_kept_collided_or_dropped(info: dict[str, Any]) -> None:
    result = normalize_info(info)
    kept: dict[str, list[tuple[str, JsonScalar]]] = {}
    empty: list[str] = []
    detected: list[str] = []  # collided paths, in the order their first loser appears
    for raw, norm, value in leaves(info):
        coerced = expected_value(value)
        if coerced is None:
            empty.append(raw)
            continue
        group = kept.setdefault(norm, [])
        group.append((raw, coerced))
        if len(group) == 2:
            detected.append(norm)

    assert result.dropped == tuple(empty)
    assert list(result.records) == list(kept)
    for path, group in kept.items():  # the first leaf in input order wins
        _, first_value = group[0]
        assert type(result.records[path]) is type(first_value)
        assert result.records[path] == first_value
    assert result.lost == sum(len(group) - 1 for group in kept.values())
    assert result.collided_paths == len(detected)
    assert result.collisions == tuple(
        Collision(
            path=path,
            sources=tuple(raw for raw, _ in kept[path][:MAX_COLLISION_SOURCES]),
            lost=len(kept[path]) - 1,
        )
        for path in detected[:MAX_COLLISIONS]
    )
    assert_every_leaf_accounted_for(info, result)


SEGMENTS = st.lists(
    st.sampled_from(["a", "B", "Foo Bar", "fooBar", "x1", "0", "café", "cafe\u0301", "", "."]),
    min_size=1,
    max_size=4,
)
FORMS = st.lists(st.booleans(), min_size=4, max_size=4)  # nest (or dot) before segment i?
SPELLINGS = st.lists(  # spell segment i differently in the second leaf?
    st.sampled_from([str, lambda s: f" {s} ", lambda s: unicodedata.normalize("NFD", s)]),
    min_size=4,
    max_size=4,
)


def build(segments: list[str], nest_before: list[bool], value: str) -> tuple[str, Any]:
    """The top key and its value for a one-leaf path, written with nested maps or dots."""
    keys: list[str] = [segments[0]]
    for segment, nest in zip(segments[1:], nest_before, strict=False):
        if nest:
            keys.append(segment)
        else:
            keys[-1] += "." + segment
    node: Any = value
    for key in reversed(keys[1:]):
        node = {key: node}
    return keys[0], node


@PROPERTY_SETTINGS
@given(SEGMENTS, FORMS, FORMS, SPELLINGS, st.booleans())
def test_property_first_wins_whatever_the_form(
    segments: list[str],
    form1: list[bool],
    form2: list[bool],
    spellings: list[Callable[[str], str]],
    swap: bool,
) -> None:
    """Two leaves at one normalized path, however written: the first one keeps it."""
    respelled = [spell(segment) for spell, segment in zip(spellings, segments, strict=False)]
    respelled[0] = f" {respelled[0]}"  # so that the two top keys differ
    entries = [build(segments, form1, "one"), build(respelled, form2, "two")]
    if swap:
        entries.reverse()
    result = normalize_info(dict(entries))
    assert result.lost == result.collided_paths == 1
    ((path, kept),) = result.records.items()
    assert kept == ("two" if swap else "one")
    (collision,) = result.collisions
    assert collision.path == path
    assert collision.lost == 1
    assert len(collision.sources) == 2


@PROPERTY_SETTINGS
@given(ANY_JSON_OBJECTS)
def test_property_any_json_object_is_accepted_and_accounted_for(info: dict[str, Any]) -> None:
    result = normalize_info(info)
    assert_every_leaf_accounted_for(info, result)
    again = normalize_info(result.records)
    assert typed(again.records) == typed(result.records)
    assert again.lost == 0 and again.dropped == ()


@PROPERTY_SETTINGS
@given(JSON_OBJECTS)
def test_property_records_are_json_scalars(info: dict[str, Any]) -> None:
    for path, value in normalize_info(info).records.items():
        assert isinstance(path, str) and path
        assert all(segment for segment in path.split("."))
        assert isinstance(value, str | int | float | bool)
        if isinstance(value, str):
            assert value and value == value.strip()
        elif isinstance(value, float):
            assert math.isfinite(value)
        elif not isinstance(value, bool):
            assert -(2**53) <= value <= 2**53


def is_word(segment: str, index: int) -> bool:
    char = segment[index]
    if char.isalnum() or char == "_":
        return True
    # a combining mark is only kept right after a letter, a digit or another kept mark
    return (
        unicodedata.category(char)[0] == "M"
        and index > 0
        and segment[index - 1] != "_"
        and is_word(segment, index - 1)
    )


@PROPERTY_SETTINGS
@given(KEYS | st.text(max_size=12))
def test_property_normalize_key_shape_and_idempotence(key: str) -> None:
    normalized = normalize_key(key)
    assert normalize_key(normalized) == normalized
    assert unicodedata.normalize("NFKC", normalized) == normalized
    if normalized == "_":
        return
    for segment in normalized.split("."):
        assert segment
        assert all(is_word(segment, index) for index in range(len(segment)))
        assert "__" not in segment
        assert not segment.startswith("_")
        assert not segment.endswith("_")
        assert segment == segment.lower()


@PROPERTY_SETTINGS
@given(KEYS | st.text(max_size=12), st.sampled_from(["NFC", "NFD", "NFKC", "NFKD"]))
def test_property_equivalent_keys_normalize_equal(key: str, form: str) -> None:
    """Canonically (NFC/NFD) and compatibility (NFKC/NFKD) equivalent keys are one key."""
    variant = unicodedata.normalize(form, key)  # type: ignore[arg-type]
    assert normalize_key(variant) == normalize_key(key)
    result = normalize_info({key: 1, variant: 2})  # one key if variant == key
    assert result.records == {normalize_key(key): 1 if variant != key else 2}
    assert result.lost == (0 if variant == key else 1)


@PROPERTY_SETTINGS
@given(STRINGS)
def test_property_coerce_value_is_stable(value: str) -> None:
    coerced = coerce_value(value)
    if isinstance(coerced, str):
        assert coerce_value(coerced) == coerced
    elif coerced is not None and not isinstance(coerced, bool):
        # a coerced number comes back unchanged from its own text
        assert coerce_value(repr(coerced)) == coerced


def test_aware_datetime_is_utc_with_z() -> None:
    moment = datetime(2024, 1, 5, 10, tzinfo=timezone(timedelta(hours=2)))
    assert coerce_value(moment.isoformat()) == "2024-01-05T08:00:00Z"
    assert datetime.fromisoformat("2024-01-05T08:00:00Z") == moment.astimezone(UTC)


@PROPERTY_SETTINGS
@given(st.lists(STRINGS, max_size=30), st.randoms(use_true_random=False))
def test_property_each_string_leaf_is_its_own_coercion_however_often_it_repeats(
    values: list[str], random: Any
) -> None:
    """`normalize_info` coerces a string seen before from what it kept of it: every leaf
    still ends as `coerce_value` of itself, in whatever order the repeats come."""
    leaves = values + values[: len(values) // 2]
    random.shuffle(leaves)
    result = normalize_info({"list": leaves})
    coerced = {f"list.{index}": coerce_value(leaf) for index, leaf in enumerate(leaves)}
    expected = {path: value for path, value in coerced.items() if value is not None}
    assert typed(result.records) == typed(expected)
    assert len(result.dropped) == len(leaves) - len(expected)
