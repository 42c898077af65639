"""The ``shadowserve://`` wire protocol: fixed binary headers, length-prefixed bodies.

Every request is a 16-byte header ``magic "SQ" | version u8 | op u8 | count u32 | body_len u64``
followed by ``body_len`` bytes. Every response is ``magic "SR" | version u8 | status u8 |
count u32 | body_len u64`` followed by its body. Fixed headers let both sides read exactly what
they need with ``recv_into`` and never over-read into a value, so a value can land straight in
the caller's buffer. All integers are little-endian.

Bodies by op:

* ``PING``: empty request and response.
* ``AUTH``: request body is the shared token; empty response.
* ``PUT``: ``count=1``; body ``klen u16 | key | value``; empty response.
* ``GET`` / ``GET_MANY``: ``count=n``; body is n keys (``klen u16 | key`` each); the response has
  ``count=n`` and n items ``vlen u64 | value`` (``vlen == MISSING`` for an absent key, no value).
* ``CONTAINS``: n keys; response body is n bytes, 1 where present.
* ``LONGEST_PREFIX``: n keys; response ``count`` is the number of leading keys present.
* ``STATS``: response body is a UTF-8 JSON object.

An error response has ``status=ERR`` and a UTF-8 message as its body; the server closes the
connection after sending it, so a client never has to guess where the next frame starts.
"""

from __future__ import annotations

import struct
from enum import IntEnum

REQUEST_MAGIC = b"SQ"
RESPONSE_MAGIC = b"SR"
VERSION = 1

HEADER = struct.Struct("<2sBBIQ")
ITEM = struct.Struct("<Q")
KEY_LEN = struct.Struct("<H")
MISSING = (1 << 64) - 1

MAX_KEY_LEN = 1024
# Key lists (GET_MANY, CONTAINS, LONGEST_PREFIX) and AUTH bodies are read whole; cap them.
MAX_CONTROL_BODY = 16 << 20
MAX_TOKEN_LEN = 4096


class Op(IntEnum):
    PING = 1
    AUTH = 2
    PUT = 3
    GET = 4
    GET_MANY = 5
    CONTAINS = 6
    LONGEST_PREFIX = 7
    STATS = 8


class Status(IntEnum):
    OK = 0
    ERR = 1


def pack_request(op: Op, count: int, body_len: int) -> bytes:
    """Header of a request frame."""
    return HEADER.pack(REQUEST_MAGIC, VERSION, op, count, body_len)


def pack_response(status: Status, count: int, body_len: int) -> bytes:
    """Header of a response frame."""
    return HEADER.pack(RESPONSE_MAGIC, VERSION, status, count, body_len)


def encode_keys(keys: list[bytes]) -> bytes:
    """Key list body: ``klen u16 | key`` per key."""
    parts = []
    for key in keys:
        parts.append(KEY_LEN.pack(len(key)))
        parts.append(key)
    return b"".join(parts)


def decode_keys(body: bytes | bytearray | memoryview, count: int) -> list[bytes]:
    """Inverse of :func:`encode_keys`; raises ``ValueError`` on any inconsistency."""
    view = memoryview(body)
    keys: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 2 > len(view):
            raise ValueError("key list truncated")
        (klen,) = KEY_LEN.unpack_from(view, pos)
        pos += 2
        if klen == 0 or klen > MAX_KEY_LEN or pos + klen > len(view):
            raise ValueError(f"bad key length {klen}")
        keys.append(bytes(view[pos : pos + klen]))
        pos += klen
    if pos != len(view):
        raise ValueError("trailing bytes after key list")
    return keys
