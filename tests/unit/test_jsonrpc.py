from __future__ import annotations

import json

import msgspec
import pytest

from mcproxy.core import jsonrpc
from mcproxy.core.jsonrpc import Kind
from mcproxy.errors import InvalidMessage, ParseError


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('{"jsonrpc":"2.0","id":1,"method":"ping"}', Kind.REQUEST),
        ('{"jsonrpc":"2.0","id":"a","method":"x","params":{"k":[1]}}', Kind.REQUEST),
        ('{"jsonrpc":"2.0","method":"notifications/initialized"}', Kind.NOTIFICATION),
        ('{"jsonrpc":"2.0","id":1,"result":{}}', Kind.RESPONSE),
        ('{"jsonrpc":"2.0","id":1,"result":null}', Kind.RESPONSE),
        ('{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"m"}}', Kind.RESPONSE),
    ],
)
def test_classify_and_round_trip(text: str, kind: Kind) -> None:
    msg = jsonrpc.decode(text)
    assert jsonrpc.kind_of(msg) is kind
    assert json.loads(jsonrpc.encode(msg)) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{", ParseError),
        ("", ParseError),
        ("[]", InvalidMessage),
        ('[{"jsonrpc":"2.0","id":1,"method":"ping"}]', InvalidMessage),
        ('{"jsonrpc":"1.0","id":1,"method":"ping"}', InvalidMessage),
        ('{"id":1,"method":"ping"}', InvalidMessage),
        ('{"jsonrpc":"2.0","id":true,"method":"ping"}', InvalidMessage),
        ('{"jsonrpc":"2.0","id":1.5,"method":"ping"}', InvalidMessage),
        ('{"jsonrpc":"2.0","id":null,"method":"ping"}', InvalidMessage),
        ('{"jsonrpc":"2.0","id":1}', InvalidMessage),
        ('{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"m"}}', InvalidMessage),
        ('{"jsonrpc":"2.0","id":1,"method":"x","result":{}}', InvalidMessage),
    ],
)
def test_rejects(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        jsonrpc.decode(text)


def test_id_keys_keep_json_types_apart() -> None:
    assert jsonrpc.id_key(1) != jsonrpc.id_key("1")
    assert jsonrpc.id_from_key(jsonrpc.id_key("1")) == "1"
    assert jsonrpc.id_from_key(jsonrpc.id_key(1)) == 1


def test_payload_bytes_are_kept_raw() -> None:
    text = '{"jsonrpc":"2.0","id":1,"result":{"b": 1.50, "a":"\\u00e9"}}'
    msg = jsonrpc.decode(text)
    rewritten = msgspec.structs.replace(msg, id=99)
    assert bytes(rewritten.result) == b'{"b": 1.50, "a":"\\u00e9"}'  # untouched, byte for byte


def test_with_meta_everywhere() -> None:
    meta = {jsonrpc.META_LSN: 7}
    result = jsonrpc.with_meta(jsonrpc.decode('{"jsonrpc":"2.0","id":1,"result":{"x":1}}'), meta)
    assert json.loads(jsonrpc.encode(result))["result"] == {"x": 1, "_meta": meta}
    merged = jsonrpc.with_meta(
        jsonrpc.decode('{"jsonrpc":"2.0","id":1,"result":{"_meta":{"k":"v"}}}'), meta
    )
    assert json.loads(jsonrpc.encode(merged))["result"]["_meta"] == {"k": "v", **meta}
    note = jsonrpc.with_meta(jsonrpc.decode('{"jsonrpc":"2.0","method":"n"}'), meta)
    assert json.loads(jsonrpc.encode(note))["params"] == {"_meta": meta}
    error = jsonrpc.with_meta(
        jsonrpc.decode('{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}'), meta
    )
    assert json.loads(jsonrpc.encode(error))["error"]["data"] == meta
    opaque = jsonrpc.decode('{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m","data":"s"}}')
    assert jsonrpc.with_meta(opaque, meta) is opaque  # non-object data is not ours to change
    null = jsonrpc.decode('{"jsonrpc":"2.0","id":1,"result":null}')
    assert jsonrpc.with_meta(null, meta) is null


def test_session_hints_are_read_and_stripped() -> None:
    for text in (
        '{"jsonrpc":"2.0","id":0,"method":"initialize","mcpSessionId":"S","params":{}}',
        '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"mcpSessionId":"S"}}',
        '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"_meta":{"mcpSessionId":"S"}}}',
    ):
        msg = jsonrpc.decode(text)
        assert jsonrpc.initialize_hints(msg) == ("S", None)
        stripped = json.loads(jsonrpc.encode(jsonrpc.strip_session_hints(msg)))
        assert "mcpSessionId" not in json.dumps(stripped)
    cursor = jsonrpc.decode(
        '{"jsonrpc":"2.0","id":0,"method":"initialize",'
        '"params":{"_meta":{"io.mcproxy/lastLsn":12,"progressToken":1}}}'
    )
    assert jsonrpc.initialize_hints(cursor) == (None, 12)
    kept = json.loads(jsonrpc.encode(jsonrpc.strip_session_hints(cursor)))
    assert kept["params"]["_meta"] == {"progressToken": 1}


def test_idempotent_tools() -> None:
    result = msgspec.Raw(
        json.dumps(
            {
                "tools": [
                    {"name": "r", "annotations": {"readOnlyHint": True}},
                    {"name": "i", "annotations": {"idempotentHint": True, "destructiveHint": True}},
                    {"name": "w", "annotations": {"readOnlyHint": False}},
                    {"name": "n", "inputSchema": {}},
                ]
            }
        ).encode()
    )
    assert jsonrpc.idempotent_tools(result) == ({"r", "i"}, {"r", "i", "w", "n"})


@pytest.mark.parametrize(
    "message",
    [
        jsonrpc.result_message(1, {}),
        jsonrpc.result_message(1, {"_meta": {"a": 1}, "x": 2}),
        jsonrpc.error_message(2, -1, "m"),
        jsonrpc.error_message(2, -1, "m", {"k": 1}),
        jsonrpc.notification_message("n"),
        jsonrpc.notification_message("n", {"p": 1}),
    ],
)
def test_without_lsn_undoes_the_lsn_meta(message: jsonrpc.Message) -> None:
    logged = jsonrpc.encode(jsonrpc.with_meta(message, {jsonrpc.META_LSN: 7}))
    assert jsonrpc.without_lsn(logged) == jsonrpc.encode(message)
