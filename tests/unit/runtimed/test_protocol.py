"""The varlink codec: framing, validation, round-trips (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtimed.errors import InvalidParamsError, Json, MalformedFrameError
from runtimed.protocol import EOF, NEED_DATA, Call, Connection, Event, Reply, Role

json_values: st.SearchStrategy[Json] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
parameters = st.dictionaries(st.text(), json_values, max_size=5)
method_names = st.from_regex(r"\A[a-z]{1,8}(\.[a-z0-9]{1,8}){1,3}\.[A-Z][A-Za-z0-9]{0,12}\Z")
calls = st.builds(
    Call,
    method=method_names,
    parameters=parameters,
    more=st.booleans(),
    upgrade=st.booleans(),
)
replies = st.builds(
    Reply,
    parameters=parameters,
    continues=st.booleans(),
    error=st.none() | method_names,
)


def _drain(conn: Connection) -> list[Event]:
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if event is EOF:
            break
    return events


@pytest.mark.slow
@settings(max_examples=60)
@given(st.lists(calls, max_size=5), st.integers(1, 64))
def test_protocol_calls_round_trip_in_any_chunking(messages: list[Call], chunk: int) -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    wire = b"".join(client.send(m) for m in messages)
    received: list[Event] = []
    for start in range(0, len(wire), chunk):
        server.receive_data(wire[start : start + chunk])
        received += _drain(server)
    server.receive_data(b"")
    received += _drain(server)
    assert received == [*messages, EOF]


@pytest.mark.slow
@settings(max_examples=60)
@given(st.lists(replies, max_size=5))
def test_protocol_replies_round_trip(messages: list[Reply]) -> None:
    server = Connection(Role.SERVER)
    client = Connection(Role.CLIENT)
    wire = b"".join(server.send(m) for m in messages)
    if wire:  # b"" would mean end of file
        client.receive_data(wire)
    assert _drain(client) == messages


@pytest.mark.parametrize(
    ("frame", "parameter"),
    [
        (b"{}", "method"),
        (b'{"method": 3}', "method"),
        (b'{"method": "Exec"}', "method"),
        (b'{"method": "runtimed.Exec"}', "method"),
        (b'{"method": "io.runtimed.exec"}', "method"),
        (b'{"method": "io.runtimed.Exec", "parameters": []}', "parameters"),
        (b'{"method": "io.runtimed.Exec", "more": 1}', "more"),
        (b'{"method": "io.runtimed.Exec", "oneway": "yes"}', "oneway"),
        (b'{"method": "io.runtimed.Exec", "more": true, "oneway": true}', "oneway"),
    ],
)
def test_protocol_invalid_call_names_the_field_and_keeps_the_connection(
    frame: bytes, parameter: str
) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame + b'\0{"method":"io.runtimed.GetPlatforms"}\0')
    with pytest.raises(InvalidParamsError) as info:
        server.next_event()
    assert info.value.details["parameter"] == parameter
    assert server.next_event() == Call(method="io.runtimed.GetPlatforms")


@pytest.mark.parametrize(
    ("frame", "parameter"),
    [
        (b'{"error": 5}', "error"),
        (b'{"error": "Nope"}', "error"),
        (b'{"parameters": "x"}', "parameters"),
        (b'{"continues": "true"}', "continues"),
    ],
)
def test_protocol_invalid_reply_names_the_field(frame: bytes, parameter: str) -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(frame + b"\0")
    with pytest.raises(InvalidParamsError) as info:
        client.next_event()
    assert info.value.details["parameter"] == parameter


@pytest.mark.parametrize(
    "wire",
    [
        b"not json\0",
        b"[1, 2]\0",
        b'"string"\0',
        b"\xff\xfe\0",
        b'{"method": "a.b.C", "parameters": {"x": NaN}}\0',
        b"[" * 100_000 + b"\0",
        b"x" * 65,  # no NUL within the limit
        b"{" + b" " * 70 + b"}\0",  # a complete frame beyond the limit
    ],
)
def test_protocol_garbage_framing_breaks_the_connection(wire: bytes) -> None:
    server = Connection(Role.SERVER, max_frame_size=64 if len(wire) < 1000 else 1_000_000)
    server.receive_data(wire)
    with pytest.raises(MalformedFrameError):
        server.next_event()
    assert server.broken
    with pytest.raises(MalformedFrameError):
        server.next_event()


def test_protocol_eof_inside_a_frame_is_malformed() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b'{"method": "a.b.C"')
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(MalformedFrameError):
        server.next_event()


def test_protocol_data_after_eof_is_malformed() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    with pytest.raises(MalformedFrameError):
        server.receive_data(b"{}")


def test_protocol_frame_exactly_at_the_limit_is_accepted() -> None:
    call = Call(method="io.runtimed.Exec", parameters={"x": "y" * 20})
    frame = Connection(Role.CLIENT).send(call)
    server = Connection(Role.SERVER, max_frame_size=len(frame) - 1)
    server.receive_data(frame)
    assert server.next_event() == call


def test_protocol_send_refuses_oversized_and_wrong_direction() -> None:
    server = Connection(Role.SERVER, max_frame_size=32)
    with pytest.raises(InvalidParamsError) as info:
        server.send(Reply(parameters={"data": "x" * 64}))
    assert info.value.details["parameter"] == "parameters"
    with pytest.raises(InvalidParamsError):
        server.send(Call(method="a.b.C"))


def test_protocol_null_fields_count_as_absent() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b'{"method":"a.b.C","parameters":null,"more":null}\0')
    assert server.next_event() == Call(method="a.b.C")


def test_protocol_wire_form_is_compact_and_omits_false_flags() -> None:
    client = Connection(Role.CLIENT)
    assert client.send(Call(method="a.b.C")) == b'{"method":"a.b.C"}\0'
    assert (
        client.send(Call(method="a.b.C", parameters={"n": 1}, more=True))
        == b'{"method":"a.b.C","parameters":{"n":1},"more":true}\0'
    )
    server = Connection(Role.SERVER)
    assert server.send(Reply(error="a.b.E", continues=True)) == (
        b'{"error":"a.b.E","parameters":{},"continues":true}\0'
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()])
def test_protocol_send_refuses_values_that_are_not_json(value: object) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises((TypeError, ValueError)):
        server.send(Reply(parameters={"x": value}))  # type: ignore[dict-item]
