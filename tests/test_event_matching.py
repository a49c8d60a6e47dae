"""The rules events are taken by (jobyard.job_engine.events), on randomized histories: events
sent before, during and after a wait begins, looks at random moments, waits one after another in
one job. Every history checks: no matching event in the window is missed, none is taken twice,
and the first look that finds one finds the one every later look would (a wait records the first,
so however its looks fall, it takes the same event)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jobyard.job_engine.events import SentEvent, choose, matches, same_json

LOOKBACK = 300.0
KEYS = ("order_id", "tenant", "paid")
VALUES = st.one_of(
    st.integers(-2, 2), st.sampled_from([1.0, 0.0, True, False, "1", "a", None]), st.just([1])
)
DATA = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3)


@st.composite
def histories(draw: Any) -> dict[str, Any]:
    """A wait that begins at 0 (with or without a timeout), events sent from 2 lookbacks before
    to past its end, stored in an order that follows their send times but for some jitter
    (senders' clocks and commits), and looks at random moments."""
    timeout = draw(st.one_of(st.none(), st.floats(0, 600)))
    drawn = draw(
        st.lists(st.tuples(st.floats(-2 * LOOKBACK, 900), st.floats(0, 5), DATA), max_size=12)
    )
    drawn.sort(key=lambda sent: sent[0] + sent[1])  # stored in the order they arrive
    events = [SentEvent(rank + 1, "e", data, at) for rank, (at, _, data) in enumerate(drawn)]
    return {
        "timeout": timeout,
        "events": events,
        "stored_at": [at + jitter for at, jitter, _ in drawn],
        "looks": sorted(draw(st.lists(st.floats(0, 1000), min_size=1, max_size=6))),
        "match": draw(DATA),
        "waits": draw(st.integers(1, 3)),
    }


def in_window(event: SentEvent, timeout: float | None) -> bool:
    return event.sent_at >= -LOOKBACK and (timeout is None or event.sent_at <= timeout)


@settings(max_examples=10_000, deadline=None)
@given(histories())
def test_no_event_missed_none_twice_the_first_found_stands(history: dict[str, Any]) -> None:
    events, timeout, match = history["events"], history["timeout"], history["match"]
    taken: list[int] = []
    for _ in range(history["waits"]):
        found = None
        for look in history["looks"]:  # each look sees what was stored by then
            seen = [e for e, at in zip(events, history["stored_at"], strict=True) if at <= look]
            found = choose(seen, match, 0.0, timeout, LOOKBACK, taken)
            if found is not None:
                break
        final = choose(events, match, 0.0, timeout, LOOKBACK, taken)  # a look after them all
        if found is not None:
            assert found == final  # the first found is the one every later look would take
            assert found.id not in taken  # never twice
            assert matches(match, found.data) and in_window(found, timeout)
        candidates = [
            e
            for e in events
            if e.id not in taken and in_window(e, timeout) and matches(match, e.data)
        ]
        assert (final is None) == (not candidates)  # none missed by a look after every send
        if final is not None:
            assert final.id == min(e.id for e in candidates)
            taken.append(final.id)
    assert len(taken) == len(set(taken))


@settings(max_examples=500, deadline=None)
@given(DATA, DATA)
def test_match_is_a_subset_of_the_data(match: dict[str, Any], data: dict[str, Any]) -> None:
    assert matches({}, data)
    assert matches(data, data)
    assert matches(match, {**data, **match})
    expected = all(k in data and same_json(data[k], v) for k, v in match.items())
    assert matches(match, data) == expected


def test_json_equality_is_not_pythons() -> None:
    assert same_json(1, 1.0) and not same_json(True, 1) and not same_json(0, False)
    assert (
        not same_json("1", 1)
        and not same_json(None, 0)
        and same_json([1, {"a": 1}], [1.0, {"a": 1}])
    )
    assert not matches({"order_id": 42}, {"order_id": "42"})
    assert not matches({"paid": True}, {"paid": 1})
    assert not matches({"order_id": 42}, {})
