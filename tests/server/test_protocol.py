"""The message validator (server/protocol.py) as a pure function: hand-made cases, and a fuzz
test asserting every generated text is either a message with exact types or a protocol error,
never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.protocol import (
    CLOSE_CODES,
    MAX_DEPTH,
    MAX_TEXT_BYTES,
    ProtocolError,
    Start,
    Stop,
    json_depth,
    parse_message,
    valid_result_id,
)
from worker.bus import ENCODINGS, MAX_RATE, MIN_RATE


def start(**kw) -> str:
    return json.dumps({"type": "start", "v": 1, "sample_rate": 16000, **kw})


def test_valid_messages():
    m = parse_message(start(channels=2, encoding="pcm_f32le", session="abc-1_F",
                            after="1733043000123-0", unknown_field={"ignored": [1]}))
    assert isinstance(m, Start) and m.session == "abc-1_F" and m.after == "1733043000123-0"
    assert (m.params.sample_rate, m.params.channels, m.params.encoding) == (16000, 2,
                                                                            "pcm_f32le")
    m = parse_message(start())
    assert (m.params.channels, m.params.encoding, m.session, m.after) == (1, "pcm_s16le", None,
                                                                          None)
    assert isinstance(parse_message('{"type": "stop", "v": 1}'), Stop)
    for rate in (MIN_RATE, 44100, 91403, MAX_RATE):  # every integer of the range
        assert parse_message(start(sample_rate=rate)).params.sample_rate == rate


@pytest.mark.parametrize("text, code, reason", [
    (start(v=True), "bad_request", "bad_version"),
    (start(v=1.0), "bad_request", "bad_version"),
    (start(v="1"), "bad_request", "bad_version"),
    (start(channels=1.0), "bad_request", "bad_channels"),
    (start(channels=True), "bad_request", "bad_channels"),
    (start(channels=None), "bad_request", "bad_channels"),
    (start(sample_rate=22050.0), "bad_request", "bad_sample_rate"),
    (start(sample_rate=False), "bad_request", "bad_sample_rate"),
    (start(sample_rate=MIN_RATE - 1), "bad_request", "bad_sample_rate"),
    (start(sample_rate=10 ** 400), "bad_request", "bad_sample_rate"),
    (start(encoding=["pcm_s16le"]), "bad_request", "bad_encoding"),
    (start(encoding={"a": 1}), "bad_request", "bad_encoding"),
    (start(session=""), "bad_request", "bad_session"),
    (start(session="x" * 129), "bad_request", "bad_session"),
    (start(session="\ud800"), "bad_request", "bad_session"),
    (start(session="s", after=str(2 ** 64)), "bad_request", "bad_after"),
    (start(session="s", after=f"1-{2 ** 63}"), "bad_request", "bad_after"),
    (start(session="s", after="01-0"), "bad_request", "bad_after"),
    (start(session="s", after="\u0661"), "bad_request", "bad_after"),  # an Arabic-Indic 1
    (start(session="s", after="+5"), "bad_request", "bad_after"),
    (start(session="s", after=5), "bad_request", "bad_after"),
    ("[" * 1000 + "]" * 1000, "bad_request", "bad_json"),
    ('{"v": 1, "type": "stop", "x": ' + "{\"a\": " * 500 + "1" + "}" * 501, "bad_request",
     "bad_json"),
    ("NaN", "bad_request", "bad_json"),
    ('{"type": "start", "v": NaN}', "bad_request", "bad_version"),
    ("", "bad_request", "bad_json"),
    ('{"type": "stop"}', "bad_request", "bad_version"),
    ('{"type": ["stop"], "v": 1}', "bad_request", "unknown_type"),
    (start(pad="x" * MAX_TEXT_BYTES), "too_large", "message_too_large"),
])
def test_bad_messages(text, code, reason):
    with pytest.raises(ProtocolError) as e:
        parse_message(text)
    assert (e.value.code, e.value.reason) == (code, reason)
    assert len(e.value.message) < 300  # a client's value is quoted, shortened


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = start(note="[[[[[[[[[[[[[[{{{{{{{{{{{{\\\"]]")
    assert json_depth(text) == 1
    assert isinstance(parse_message(text), Start)
    assert json_depth('{"a": [[[1]], {"b": "]]]]"}]}') == 4


def test_result_ids():
    assert all(valid_result_id(x) for x in ("0", "17", "1733043000123-0", f"{2 ** 63 - 1}-0"))
    assert not any(valid_result_id(x) for x in ("", "-1", "1-", "1--2", "1-2-3", "0x10", "1.5",
                                                 "1 ", str(2 ** 63), None, 3, True))


def test_error_messages_say_when_to_retry():
    assert ProtocolError("unavailable", "m").to_message()["retry_after_s"] > 0
    assert ProtocolError("busy", "m").to_message()["retry_after_s"] > 0
    assert "retry_after_s" not in ProtocolError("bad_request", "m").to_message()
    assert CLOSE_CODES["unavailable"] == 1013
    with pytest.raises(ValueError):
        ProtocolError("nonsense", "m")


# ---------------------------------------------------------------------------------- fuzzing
FIELDS = ("type", "v", "sample_rate", "channels", "encoding", "session", "after")
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=40)
           | st.sampled_from(["start", "stop", "pcm_s16le", "pcm_f32le", "0", "1-0", "abc",
                              str(2 ** 64), "1_0"])
           | st.sampled_from([0, 1, 2, 8000, 16000, 96000, 96001, 2 ** 64, -1, 1.0, 2.0]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
# Mostly plausible messages (known fields, sometimes right), some anything at all.
messages = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=9)
near_valid = st.fixed_dictionaries(
    {"type": st.just("start"), "v": st.just(1) | values,
     "sample_rate": st.integers(MIN_RATE - 10, MAX_RATE + 10) | values},
    optional={"channels": st.sampled_from([1, 2]) | values,
              "encoding": st.sampled_from(sorted(ENCODINGS)) | values,
              "session": st.from_regex(r"[a-f0-9]{32}", fullmatch=True) | values,
              "after": st.from_regex(r"(0|[1-9][0-9]{0,20})(-(0|[1-9][0-9]{0,20}))?",
                                     fullmatch=True) | values})
texts = (st.one_of(messages, near_valid, values).map(json.dumps)
         | st.text(max_size=200)
         | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
         | st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n))


def check(text: str) -> None:
    try:
        msg = parse_message(text)
    except ProtocolError as e:
        assert e.code in ("bad_request", "too_large") and e.reason and e.message
        return
    data = json.loads(text)  # accepted: it is JSON, and the message says exactly what it said
    assert type(data["v"]) is int and data["v"] == 1
    if isinstance(msg, Stop):
        assert data["type"] == "stop"
        return
    p = msg.params
    assert data["type"] == "start" and type(p.sample_rate) is int
    assert p.sample_rate == data["sample_rate"] and MIN_RATE <= p.sample_rate <= MAX_RATE
    assert type(p.channels) is int and p.channels == data.get("channels", 1) in (1, 2)
    assert type(p.encoding) is str and p.encoding == data.get("encoding", "pcm_s16le")
    assert msg.session == data.get("session") and msg.after == data.get("after")
    assert msg.session is None or type(msg.session) is str
    assert msg.after is None or valid_result_id(msg.after)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts)
@example('{"type":"start","v":1,"sample_rate":22050,"channels":1.0}')
@example('{"type":"start","v":true,"sample_rate":22050}')
@example('{"type":"start","v":1,"sample_rate":22050,"encoding":[]}')
@example('{"type":"start","v":1,"sample_rate":22050,"session":"a","after":"18446744073709551616"}')
def test_fuzz_every_message_is_valid_or_a_protocol_error(text):
    check(text)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes_decoded_as_text(raw):
    check(raw.decode("utf-8", "replace"))


def test_depth_bound_is_below_the_recursion_limit():
    assert MAX_DEPTH < 100


def test_every_error_code_has_its_metric_series():
    from server.metrics import ERROR_CODES

    assert set(ERROR_CODES) == set(CLOSE_CODES)
