"""The one converter between wire JSON and protocol messages, and the event encoder.

Control messages go through a single cattrs converter (orjson underneath) with strict
primitive hooks: ``"5"`` is not an int and ``5`` is not a string. Events do not: an event is
encoded once per broker message for every subscriber, so ``encode_event`` splices the
publisher's JSON body into the envelope without parsing it again, and ``text_frame`` puts the
WebSocket header in front once, so the fan-out writes the same bytes to every socket.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import attrs
import cattrs
import orjson
from cattrs.cols import is_mapping, is_sequence, list_structure_factory, mapping_structure_factory
from cattrs.dispatch import StructureHook, TargetType
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.orjson import make_converter

from odin_fanout.protocol.errors import ClientError, ErrorCode
from odin_fanout.protocol.messages import (
    CLIENT_MESSAGE_TYPES,
    GapNotice,
    Range,
    ReplayData,
    Request,
    ServerMessage,
)
from odin_fanout.protocol.publication import Publication

T = TypeVar("T")

_MAX_ID_LENGTH = 64


def _strict(kind: type[T]) -> StructureHook:
    def structure(value: object, _: TargetType) -> T:
        # bool is an int subclass in Python but never an int on the wire.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


def _requiring(shape: type, inner: StructureHook) -> StructureHook:
    """Wrap a generated hook so it refuses values of the wrong JSON shape up front (cattrs
    would turn the string "BTC" into the list ["B", "T", "C"])."""

    def structure(value: object, kind: TargetType) -> object:
        if not isinstance(value, shape):
            expected = "a list" if shape is list else "an object"
            raise TypeError(f"expected {expected}, got {type(value).__name__}")
        return inner(value, kind)

    return structure


def _make_converter() -> cattrs.Converter:
    converter = make_converter(forbid_extra_keys=False, omit_if_default=True)
    for kind in (str, int, bool):
        converter.register_structure_hook(kind, _strict(kind))

    def lists(cls: TargetType) -> StructureHook:
        return _requiring(list, list_structure_factory(cls, converter))

    def mappings(cls: TargetType) -> StructureHook:
        return _requiring(dict, mapping_structure_factory(cls, converter))

    def objects(cls: TargetType) -> StructureHook:
        return _requiring(dict, make_dict_structure_fn(cls, converter))

    converter.register_structure_hook_factory(is_sequence, lists)
    converter.register_structure_hook_factory(is_mapping, mappings)
    converter.register_structure_hook_factory(attrs.has, objects)
    # "from" is a Python keyword: these fields are from_seq / to_seq in code.
    wire = {"from_seq": override(rename="from"), "to_seq": override(rename="to")}
    converter.register_structure_hook(
        ReplayData,
        _requiring(dict, make_dict_structure_fn(ReplayData, converter, from_seq=wire["from_seq"])),
    )
    for cls in (Range, GapNotice):
        converter.register_unstructure_hook(
            cls,
            make_dict_unstructure_fn(
                cls,
                converter,
                _cattrs_omit_if_default=True,
                from_seq=wire["from_seq"],
                to_seq=wire["to_seq"],
            ),
        )
    return converter


CONVERTER = _make_converter()


def _format_error(exc: BaseException, _: object) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    return str(exc)


# Python names of renamed fields, as they appear in error paths, and their wire names.
_WIRE_PATHS = ((".from_seq", ".from"), (".to_seq", ".to"))


def _describe(exc: Exception) -> str:
    if isinstance(exc, cattrs.ClassValidationError | cattrs.IterableValidationError):
        lines = cattrs.transform_error(exc, format_exception=_format_error)
        # cattrs reports attribute names; the client knows the names it sent.
        for python, wire in _WIRE_PATHS:
            lines = [line.replace(python, wire) for line in lines]
        return "; ".join(lines)
    return str(exc)


def decode_request(frame: str | bytes) -> Request:
    """Decode one client text frame, or raise ClientError with the code to reply with."""
    try:
        document = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ClientError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ClientError(ErrorCode.INVALID_MESSAGE, "a message is a JSON object with a 'type'")
    kind = document.get("type")
    request_id = document.get("id")
    if request_id is not None and not _valid_id(request_id):
        raise ClientError(
            ErrorCode.INVALID_MESSAGE, "'id' must be an integer or a string of at most 64 chars"
        )
    if not isinstance(kind, str):
        raise ClientError(
            ErrorCode.INVALID_MESSAGE, "missing string field 'type'", request_id=request_id
        )
    cls = CLIENT_MESSAGE_TYPES.get(kind)
    if cls is None:
        known = ", ".join(sorted(CLIENT_MESSAGE_TYPES))
        raise ClientError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown type {kind!r} (known: {known})",
            request_id=request_id,
        )
    body = {key: value for key, value in document.items() if key not in ("type", "id")}
    try:
        message = CONVERTER.structure(body, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise ClientError(
            ErrorCode.INVALID_MESSAGE,
            f"{kind}: {_describe(exc)}",
            request_type=kind,
            request_id=request_id,
        ) from None
    return Request(message=message, id=request_id)


def _valid_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and len(value) <= _MAX_ID_LENGTH


def encode(message: ServerMessage) -> bytes:
    """Encode a control reply as JSON text (UTF-8), ``type`` first."""
    body = CONVERTER.unstructure(message)
    return orjson.dumps({"type": message.TYPE, **body})


# ---- events ------------------------------------------------------------------------------

# Control reply types that an event envelope must never claim, or clients would misroute it.
_RESERVED_TYPES = frozenset(
    {
        "hello",
        "pong",
        "subscription_ack",
        "unsubscription_ack",
        "error",
        "replay_complete",
        "replay_incomplete",
        "gap",
        "reconnect",
        "auth_ok",
        "token_expiring",
    }
)


def event_type(channel: str, payload: object) -> str:
    """The envelope ``type``: the payload's own ``type`` (the original sent ``price:update``),
    else ``<event>:update`` from the channel."""
    if isinstance(payload, dict):
        declared = payload.get("type")
        if (
            isinstance(declared, str)
            and 0 < len(declared) <= 64
            and declared not in _RESERVED_TYPES
        ):
            return declared
    return channel.partition(".")[2] + ":update"


# JSON of the pieces that repeat from event to event (type and channel, epoch), encoded once.
_PREFIXES: dict[tuple[str, str], bytes] = {}
_EPOCHS: dict[str, bytes] = {}
_CACHE_LIMIT = 10_000


def encode_event(publication: Publication, type_name: str) -> bytes:
    """The event envelope, with the publisher's JSON spliced in verbatim as ``data``."""
    key = (type_name, publication.channel)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        if len(_PREFIXES) >= _CACHE_LIMIT:
            _PREFIXES.clear()
        prefix = _PREFIXES[key] = b"".join(
            (b'{"type":', orjson.dumps(type_name), b',"channel":',
             orjson.dumps(publication.channel), b',"seq":')
        )  # fmt: skip
    epoch = _EPOCHS.get(publication.epoch)
    if epoch is None:
        if len(_EPOCHS) >= _CACHE_LIMIT:
            _EPOCHS.clear()
        epoch = _EPOCHS[publication.epoch] = orjson.dumps(publication.epoch)
    return b'%s%d,"prev":%d,"epoch":%s,"ts":%d,"data":%s}' % (
        prefix,
        publication.seq,
        publication.prev,
        epoch,
        int(publication.ts * 1000),
        publication.payload,
    )


def encode_gap(gap_channel: str, from_seq: int, to_seq: int, reason: str) -> bytes:
    return encode(GapNotice(channel=gap_channel, from_seq=from_seq, to_seq=to_seq, reason=reason))


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked server-to-client WebSocket text frame (RFC 6455 section 5.2).

    Written by hand because wsproto's public API builds a text frame only from ``str``; the
    fan-out holds UTF-8 bytes and would pay a decode and an encode per message. Tested
    against wsproto's parser.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload
