"""Property-based tests of payload decoding at the boundary (issue 12): whatever arrives, decoding
and encoding either give strict JSON within the size limit or raise the documented error
(StrictJSONError from `strictjson.loads`, InvalidPayloadError - PayloadTooLargeError included -
from `JobSpec.encode`), never anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jobyard.job_engine import InvalidPayloadError, PayloadTooLargeError, env, get_spec, strictjson
from tests import jobs as test_jobs  # noqa: F401  (declares test.fragile)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text with everything Python's str can hold, lone surrogates included.
any_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=20)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
python_values = st.recursive(
    scalars | st.binary(max_size=5) | st.tuples(st.integers()),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(any_text | st.integers(), children, max_size=4)
    ),
    max_leaves=30,
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4),
    max_leaves=30,
)


def _is_strict(value: object) -> None:
    """Raises unless `value` round-trips through a strict UTF-8 JSON encoder."""
    json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_strict_json_error(raw: bytes) -> None:
    try:
        value = strictjson.loads(raw)
    except strictjson.StrictJSONError:
        return
    _is_strict(value)


@SETTINGS
@given(json_values)
def test_json_text_with_nan_or_surrogates_is_refused_and_the_rest_round_trips(value) -> None:
    text = json.dumps(value, allow_nan=True)  # Python's writer: NaN tokens, \\udc00 escapes
    try:
        decoded = strictjson.loads(text)
    except strictjson.StrictJSONError:
        with pytest.raises((ValueError, UnicodeEncodeError)):
            _is_strict(value)
        return
    _is_strict(decoded)
    assert decoded == value


@SETTINGS
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", '{"a":']))
def test_nesting_of_any_depth_is_refused_past_the_limit(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    try:
        strictjson.loads(text)
    except strictjson.StrictJSONError:
        assert depth > strictjson.MAX_DEPTH
        return
    assert depth <= strictjson.MAX_DEPTH


@SETTINGS
@given(st.dictionaries(any_text | st.integers(), python_values, max_size=5))
def test_encode_gives_strict_json_within_the_limit_or_invalid_payload_error(payload) -> None:
    spec = get_spec("system.echo")  # accepts any object: the boundary is all that is tested
    try:
        data = spec.encode(payload)
    except InvalidPayloadError:
        return
    _is_strict(data)
    assert len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()) <= (
        env.get_int(env.MAX_PAYLOAD_BYTES)
    )


@SETTINGS
@given(st.binary(max_size=200) | any_text)
def test_encode_of_raw_text_raises_only_invalid_payload_error(raw) -> None:
    spec = get_spec("system.echo")
    try:
        data = spec.encode(raw)
    except InvalidPayloadError:
        return
    _is_strict(data)


def test_the_size_limit_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.MAX_PAYLOAD_BYTES, "20")
    spec = get_spec("system.echo")
    assert spec.encode({"a": "x" * 12}) == {"a": "x" * 12}  # {"a":"xxxxxxxxxxxx"}: 20 bytes
    with pytest.raises(PayloadTooLargeError) as caught:
        spec.encode({"a": "x" * 13})
    assert (caught.value.size, caught.value.limit) == (21, 20)
    assert isinstance(caught.value, InvalidPayloadError)  # callers refusing bad payloads catch it


def _outcome(spec_name: str, payload: object) -> object:
    """`encode`'s result, or its error as (type, message)."""
    try:
        return get_spec(spec_name).encode(payload)
    except InvalidPayloadError as exc:
        return (type(exc), str(exc))


@SETTINGS
@given(
    st.sampled_from(["system.echo", "email.send", "test.fragile"]),
    st.lists(
        st.dictionaries(any_text | st.integers(), python_values, max_size=4)
        | st.builds(lambda to: {"to": to, "subject": "s", "template": "t"}, any_text)
        # valid for test.fragile but for what its schema drops (extra keys: NaN, surrogates...)
        | st.builds(
            lambda text, extra: {**extra, "marker_dir": text},
            any_text,
            st.dictionaries(any_text, python_values, max_size=3),
        )
        | any_text,
        max_size=8,
    ),
)
@example("test.fragile", [{"marker_dir": "a", "x": float("nan")}, {"marker_dir": "b", "\udc00": 1}])
def test_encode_many_gives_what_encode_gives_for_each_payload(name: str, payloads) -> None:
    """dispatch_many's batch path checks each payload exactly as dispatch_job does: the same
    data, or the same error with the same message; its JSON text is the data's."""
    batch = get_spec(name).encode_many(payloads)
    assert len(batch) == len(payloads)
    for payload, got in zip(payloads, batch, strict=True):
        expected = _outcome(name, payload)
        if isinstance(expected, tuple):
            assert (type(got), str(got)) == expected
        else:
            assert not isinstance(got, Exception)
            assert got.data == expected
            assert json.loads(got.text) == expected


@SETTINGS
@given(python_values)
def test_dumps_writes_what_json_dumps_writes_or_refuses(value) -> None:
    """strictjson.dumps runs json's C encoder made once: the same text as json.dumps with the
    same settings, and a StrictJSONError wherever json.dumps (or UTF-8) fails."""
    try:
        expected = json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        with pytest.raises(strictjson.StrictJSONError):
            strictjson.dumps(value)
        return
    assert strictjson.dumps(value) == expected


@SETTINGS
@given(python_values, st.booleans())
@example({"a": 1, "b": "x", "c": None, "d": 1.5, "e": True}, False)
@example({"a": float("nan")}, False)
@example({"a": "\udc00"}, True)
@example({1: "x"}, False)
def test_check_of_an_object_judges_as_the_walk_does(value, other_types: bool) -> None:
    """`check` passes a flat object of plain values at a glance: wrapped in a list (which takes
    the full walk), every value gets the same verdict."""

    def verdict(checked: object, depth: int) -> bool:
        try:
            strictjson.check(checked, max_depth=depth, other_types=other_types)
        except strictjson.StrictJSONError:
            return False
        return True

    assert verdict(value, strictjson.MAX_DEPTH) == verdict([value], strictjson.MAX_DEPTH + 1)
