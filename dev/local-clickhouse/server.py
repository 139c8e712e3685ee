#!/usr/bin/env python3
"""A local ClickHouse server for development and tests.

It serves the part of ClickHouse's HTTP interface (the port-8123 protocol) that the official
Rust `clickhouse` crate, curl and notebook clients use, on top of the ClickHouse engine that PyPI
`chdb-core` embeds in-process. It exists because these machines have no Docker and the only
clickhouse-server package available (Debian's) is from 2018; production and docker-compose use the
real `clickhouse/clickhouse-server`, and a client must not be able to tell the two apart.

What it serves:
  GET /ping, GET /replicas_status          -> "Ok.\\n"
  GET /?query=...                          -> read-only queries (GET implies readonly, as upstream)
  POST / with the query in the URL, in the body, or both (the body is appended to the URL query,
         which is how `INSERT ... FORMAT X` takes its data); `multipart/form-data` bodies with a
         `query` field and `param_*` fields (what the crate's `.param()` sends)
  Query parameters `param_*`, `database`, `default_format`, `query_id`, `session_id`,
  `wait_end_of_query`, `compress`/`decompress` (ClickHouse's native LZ4 block framing), and any
  other URL parameter as a ClickHouse setting for that query only.
  Errors: HTTP 4xx/5xx, `X-ClickHouse-Exception-Code`, body `Code: N. DB::Exception: ...`; errors
  after the body started streaming use the 25.11+ tagged exception block.

Not served (a ClickHouse-style error says so): external tables in multipart bodies, users and
roles (every credential is accepted), zstd/br/xz request bodies, the /play and /dashboard UIs.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import random
import signal
import socket
import string
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("local-clickhouse")

# Filled in by Engine.start() from the engine itself.
ENGINE_VERSION = "unknown"
VERSION_SUFFIX = "(version unknown (chdb))"

# HTTP-interface parameters that are not settings (ClickHouse's HTTPHandler reserved names).
RESERVED_PARAMS = frozenset(
    {
        "query", "database", "default_format", "compress", "decompress", "user", "password",
        "quota_key", "query_id", "stacktrace", "role", "buffer_size", "wait_end_of_query",
        "session_id", "session_timeout", "session_check", "client_protocol_version",
        "close_session",
    }
)

MAX_BODY_CHUNK = 1 << 20
# A statement is never this long before its inline data starts; past it we stop looking.
MAX_INSERT_HEAD = 4 << 20
POOL_WAIT_SECONDS = 60.0
GET_IS_READONLY = ("Cannot execute query in readonly mode. For queries over HTTP, method GET "
                   "implies readonly. You should use method POST for modifying queries")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

# Error names by code. Replaced at start-up by the engine's own table (errorCodeToName); these
# are the ones this file raises itself, so messages are right even before that.
ERROR_NAMES = {
    36: "BAD_ARGUMENTS", 40: "CHECKSUM_DOESNT_MATCH", 48: "NOT_IMPLEMENTED", 62: "SYNTAX_ERROR",
    89: "UNKNOWN_COMPRESSION_METHOD", 115: "UNKNOWN_SETTING", 164: "READONLY",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES", 209: "SOCKET_TIMEOUT", 271: "CANNOT_DECOMPRESS",
    372: "SESSION_NOT_FOUND", 373: "SESSION_IS_LOCKED", 381: "HTTP_LENGTH_REQUIRED",
    1001: "STD_EXCEPTION",
}
ERROR_CODES = {name: code for code, name in ERROR_NAMES.items()}

# ClickHouse's src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, by error name.
_STATUS_BY_NAME = {
    401: ["REQUIRED_PASSWORD"],
    403: ["UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE",
          "ACCESS_DENIED"],
    400: ["BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT",
          "CANNOT_PARSE_ESCAPE_SEQUENCE", "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE",
          "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER", "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
          "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6", "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
          "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN", "UNKNOWN_ELEMENT_IN_AST",
          "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST", "TOO_BIG_AST",
          "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
          "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"],
    404: ["UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE",
          "UNKNOWN_STORAGE", "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
          "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE",
          "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE"],
    413: ["QUERY_IS_TOO_LARGE"],
    501: ["NOT_IMPLEMENTED"],
    503: ["SOCKET_TIMEOUT", "CANNOT_OPEN_FILE", "CANNOT_SCHEDULE_TASK"],
    411: ["HTTP_LENGTH_REQUIRED"],
    408: ["TIMEOUT_EXCEEDED"],
    415: ["UNSUPPORTED_MEDIA_TYPE"],
}
HTTP_STATUS_BY_NAME = {name: status for status, names in _STATUS_BY_NAME.items() for name in names}


class ClickHouseError(Exception):
    """An error as ClickHouse reports it: a numeric code and the full `Code: N. DB::Exception` text."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text

    @classmethod
    def new(cls, name: str, message: str) -> "ClickHouseError":
        code = ERROR_CODES.get(name, 1001)
        return cls(code, f"Code: {code}. DB::Exception: {message}. ({name}) {VERSION_SUFFIX}")

    @classmethod
    def from_engine(cls, exc: BaseException) -> "ClickHouseError":
        """chdb raises RuntimeError("Code: 62. DB::Exception: ... (SYNTAX_ERROR)"): keep the text,
        add the version suffix every server error ends with."""
        text = str(exc).strip()
        if text.startswith("Code: "):
            try:
                code = int(text[6:text.index(".")])
            except ValueError:
                code = 1001
            if "(version " not in text[-80:]:
                text = f"{text} {VERSION_SUFFIX}"
            return cls(code, text)
        return cls.new("STD_EXCEPTION", text or type(exc).__name__)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS_BY_NAME.get(ERROR_NAMES.get(self.code, ""), 500)


# ---------------------------------------------------------------------------------------------
# SQL scanning: just enough lexing to find where INSERT data starts and which FORMAT a query asks
# for, without being fooled by strings, quoted identifiers, comments or parentheses.
# ---------------------------------------------------------------------------------------------

_WORD_START = frozenset(string.ascii_letters + "_")
_WORD_CHARS = frozenset(string.ascii_letters + string.digits + "_$")
_NUMBER_CHARS = frozenset(string.ascii_letters + string.digits + "_.")
_SPACE = frozenset(" \t\r\n\f\v")


class _Incomplete(Exception):
    """A token may continue past the end of the text read so far."""


@dataclass
class Token:
    kind: str  # "word", "quoted", "number", "punct"
    start: int
    end: int


def tokens(text: str, eof: bool = True) -> Iterator[Token]:
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif text.startswith("--", i) or text.startswith("#!", i) or text.startswith("# ", i):
            j = text.find("\n", i)
            if j < 0:
                if not eof:
                    raise _Incomplete
                return
            i = j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                if not eof:
                    raise _Incomplete
                return
            i = j + 2
        elif c in "'\"`":
            j = i + 1
            while True:
                if j >= n:
                    if not eof:
                        raise _Incomplete
                    yield Token("quoted", i, n)
                    return
                if text[j] == "\\":
                    j += 2
                elif text[j] == c:
                    if j + 1 < n and text[j + 1] == c:  # doubled quote inside the literal
                        j += 2
                    elif j + 1 >= n and not eof:
                        raise _Incomplete
                    else:
                        j += 1
                        break
                else:
                    j += 1
            yield Token("quoted", i, j)
            i = j
        elif c in _WORD_START or c.isdigit():
            chars = _WORD_CHARS if c in _WORD_START else _NUMBER_CHARS
            j = i + 1
            while j < n and text[j] in chars:
                j += 1
            if j >= n and not eof:
                raise _Incomplete
            yield Token("word" if c in _WORD_START else "number", i, j)
            i = j
        else:
            yield Token("punct", i, i + 1)
            i += 1


@dataclass
class InsertWithData:
    head: str  # the statement without FORMAT/VALUES, as chdb's send_insert wants it
    fmt: str
    data_start: int  # offset in the scanned text where the data begins


NEED_MORE = "need_more"
NOT_INSERT_WITH_DATA = "other"


def scan_insert(text: str, eof: bool):
    """Classifies the beginning of a request's SQL text.

    Returns InsertWithData for `INSERT ... FORMAT X <data>` and `INSERT ... VALUES <data>`,
    NOT_INSERT_WITH_DATA for anything else (including INSERT ... SELECT), or NEED_MORE if the text
    read so far cannot tell. `text` is the raw bytes decoded as latin-1, so offsets are byte
    offsets and binary data after the head does not break decoding.
    """
    toks = tokens(text, eof)
    try:
        first = next(toks, None)
        if first is None:
            return NOT_INSERT_WITH_DATA if eof else NEED_MORE
        if first.kind != "word" or text[first.start:first.end].upper() != "INSERT":
            return NOT_INSERT_WITH_DATA
        depth = 0
        for tok in toks:
            if tok.kind == "punct":
                ch = text[tok.start]
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                elif ch == ";" and depth == 0:
                    return NOT_INSERT_WITH_DATA
                continue
            if tok.kind != "word" or depth != 0:
                continue
            word = text[tok.start:tok.end].upper()
            if word == "FORMAT":
                name = next(toks, None)
                if name is None:
                    if eof:
                        return NOT_INSERT_WITH_DATA
                    raise _Incomplete
                if name.kind != "word":
                    return NOT_INSERT_WITH_DATA
                # As ClickHouse's parser: data starts after the format name, spaces and at most
                # one line break. Binary data may itself begin with such bytes, which is why
                # clients put a newline there (and why the URL query gets "\n" appended).
                j, n = name.end, len(text)
                while j < n and text[j] in " \t\f":
                    j += 1
                newline = False
                if text.startswith("\r\n", j):
                    j, newline = j + 2, True
                elif text.startswith("\n", j):
                    j, newline = j + 1, True
                if not newline and j >= n and not eof:
                    raise _Incomplete
                return InsertWithData(text[:tok.start], text[name.start:name.end], j)
            if word == "VALUES":
                return InsertWithData(text[:tok.start], "Values", tok.end)
            if word in ("SELECT", "WITH"):
                return NOT_INSERT_WITH_DATA
        return NOT_INSERT_WITH_DATA if eof else NEED_MORE
    except _Incomplete:
        return NEED_MORE


@dataclass
class QueryShape:
    first_word: str = ""
    second_word: str = ""
    explicit_format: Optional[str] = None
    second_statement_at: Optional[int] = None  # offset of a ';' followed by another statement


def analyze_query(text: str) -> QueryShape:
    shape = QueryShape()
    try:
        toks = list(tokens(text, eof=True))
    except _Incomplete:  # cannot happen with eof=True; keep the engine's own error path
        return shape
    if not toks:
        return shape
    first = toks[0]
    shape.first_word = text[first.start:first.end].upper() if first.kind == "word" else text[first.start]
    if len(toks) > 1 and toks[1].kind == "word":
        shape.second_word = text[toks[1].start:toks[1].end].upper()
    depth = 0
    for idx, tok in enumerate(toks):
        if tok.kind == "punct":
            ch = text[tok.start]
            depth += ch == "("
            depth -= ch == ")"
            if ch == ";" and depth == 0 and idx + 1 < len(toks) and shape.second_statement_at is None:
                if any(not (t.kind == "punct" and text[t.start] == ";") for t in toks[idx + 1:]):
                    shape.second_statement_at = tok.start
            continue
        if depth or tok.kind != "word" or text[tok.start:tok.end].upper() != "FORMAT":
            continue
        # `FORMAT name` must end the statement (or be followed by SETTINGS / ';'), which tells it
        # apart from a column or function called `format`.
        if idx + 1 < len(toks) and toks[idx + 1].kind == "word":
            after = toks[idx + 2] if idx + 2 < len(toks) else None
            if (after is None
                    or (after.kind == "punct" and text[after.start] == ";")
                    or (after.kind == "word" and text[after.start:after.end].upper() == "SETTINGS")):
                name = toks[idx + 1]
                shape.explicit_format = text[name.start:name.end]
    return shape


# ---------------------------------------------------------------------------------------------
# Output formats: which ones can be streamed chunk by chunk, and how to drop the header that
# chdb repeats at the start of every streamed chunk (pitfall 1).
# ---------------------------------------------------------------------------------------------

# Formats whose chunks concatenate into a valid stream as they are.
_PLAIN_STREAMABLE = {
    "tabseparated", "tsv", "tabseparatedraw", "tsvraw", "raw", "csv", "jsoneachrow", "jsonlines",
    "ndjson", "jsoncompacteachrow", "jsonstringseachrow", "jsoncompactstringseachrow",
    "rowbinary", "native", "tskv", "lineasstring", "rawblob", "values", "null",
}
# Formats whose every chunk starts with N header lines (names, then types).
_LINE_HEADER = {}
for _base in ("tabseparated", "tsv", "tabseparatedraw", "tsvraw", "raw", "csv",
              "jsoncompacteachrow", "jsoncompactstringseachrow"):
    _LINE_HEADER[_base + "withnames"] = 1
    _LINE_HEADER[_base + "withnamesandtypes"] = 2
# Formats with a binary header: column count, then names (and types).
_ROWBINARY_HEADER = {"rowbinarywithnames": 1, "rowbinarywithnamesandtypes": 2}


def is_streamable(fmt: str) -> bool:
    key = fmt.lower()
    return key in _PLAIN_STREAMABLE or key in _LINE_HEADER or key in _ROWBINARY_HEADER


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varuint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def header_length(fmt: str, data: bytes) -> int:
    """Length of the format header at the start of `data` (0 for formats without one)."""
    key = fmt.lower()
    if key in _ROWBINARY_HEADER:
        count, pos = _read_varuint(data, 0)
        for _ in range(count * _ROWBINARY_HEADER[key]):
            size, pos = _read_varuint(data, pos)
            pos += size
        if pos > len(data):
            raise ValueError("truncated header")
        return pos
    lines = _LINE_HEADER.get(key, 0)
    pos = 0
    csv = key.startswith("csv")
    for _ in range(lines):
        if csv:  # a quoted CSV column name may contain a newline
            quoted = False
            while pos < len(data):
                ch = data[pos]
                pos += 1
                if ch == 0x22:
                    quoted = not quoted
                elif ch == 0x0A and not quoted:
                    break
        else:
            nl = data.find(b"\n", pos)
            pos = len(data) if nl < 0 else nl + 1
    return pos


class HeaderStripper:
    """Keeps the header of the first chunk, removes the identical copy from every later chunk."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.header: Optional[bytes] = None

    def __call__(self, data: bytes) -> bytes:
        if self.header is None:
            self.header = data[:header_length(self.fmt, data)]
            return data
        if self.header and data.startswith(self.header):
            return data[len(self.header):]
        return data


def content_type_for(fmt: str) -> str:
    key = fmt.lower()
    if key.startswith(("tabseparated", "tsv")) or key == "raw":
        return "text/tab-separated-values; charset=UTF-8"
    if key.startswith("csv"):
        return "text/csv; charset=UTF-8; header=" + ("present" if "withnames" in key else "absent")
    if key.startswith("json") or key == "ndjson":
        return "application/json; charset=UTF-8"
    if key == "xml":
        return "application/xml; charset=UTF-8"
    if key.startswith(("rowbinary", "native", "parquet", "arrow", "orc", "avro", "protobuf",
                       "capnproto", "msgpack", "rawblob", "bsoneachrow", "npy")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


# ---------------------------------------------------------------------------------------------
# Request bodies: HTTP framing, Content-Encoding, and ClickHouse's native block compression.
# ---------------------------------------------------------------------------------------------

class BodyReader:
    """The request body as a sequence of chunks, for Content-Length and chunked bodies."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.remaining = 0
        if not self.chunked:
            length = headers.get("Content-Length")
            try:
                self.remaining = int(length) if length else 0
            except ValueError:
                raise ClickHouseError.new("BAD_ARGUMENTS", f"Invalid Content-Length: {length!r}")
        self.done = not self.chunked and self.remaining == 0
        self.broken = False

    def _next(self) -> bytes:
        if self.chunked:
            line = self.rfile.readline(1024)
            if not line:
                raise EOFError("connection closed inside a chunked request body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                self.done = True
                return b""
            data = self.rfile.read(size)
            if len(data) < size or self.rfile.readline(8) not in (b"\r\n", b"\n"):
                raise EOFError("truncated chunk in request body")
            return data
        data = self.rfile.read(min(self.remaining, MAX_BODY_CHUNK))
        if not data:
            raise EOFError("connection closed inside the request body")
        self.remaining -= len(data)
        self.done = self.remaining == 0
        return data

    def chunks(self) -> Iterator[bytes]:
        try:
            while not self.done:
                data = self._next()
                if data:
                    yield data
        except (OSError, EOFError, ValueError):
            self.broken = True
            raise

    def read_all(self) -> bytes:
        return b"".join(self.chunks())

    def drain(self) -> None:
        """Reads the rest of the body, so the client gets our answer instead of a reset socket."""
        try:
            for _ in self.chunks():
                pass
        except Exception:
            self.broken = True


def content_decoder(encoding: str) -> Optional[Callable[[Iterable[bytes]], Iterator[bytes]]]:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 31 if "gzip" in encoding else 15

        def inflate(chunks):
            d = zlib.decompressobj(wbits)
            for chunk in chunks:
                out = d.decompress(chunk)
                if out:
                    yield out
            tail = d.flush()
            if tail:
                yield tail
        return inflate
    if encoding == "lz4":
        import lz4.frame

        def unlz4(chunks):
            d = lz4.frame.LZ4FrameDecompressor()
            for chunk in chunks:
                while chunk:
                    out = d.decompress(chunk)
                    if out:
                        yield out
                    if d.eof:  # concatenated frames
                        chunk = d.unused_data
                        d = lz4.frame.LZ4FrameDecompressor()
                    else:
                        chunk = b""
        return unlz4
    raise ClickHouseError.new(
        "UNKNOWN_COMPRESSION_METHOD",
        f"Content-Encoding {encoding!r} is not supported by the local ClickHouse server "
        "(it accepts gzip, deflate and lz4)")


NATIVE_LZ4, NATIVE_NONE, NATIVE_ZSTD = 0x82, 0x02, 0x90


def native_checksum(block: bytes) -> bytes:
    # CityHash128 (v1.0.2) of method byte + sizes + payload. On the wire: the high 64 bits of
    # clickhouse-cityhash's 128-bit integer first, then the low 64 bits, each little-endian.
    from clickhouse_cityhash.cityhash import CityHash128
    value = CityHash128(block)
    return (value >> 64).to_bytes(8, "little") + (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


def native_decompress(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decodes ClickHouse's compressed block framing (`decompress=1` request bodies):
    16-byte checksum, method byte, u32 compressed size (with the 9-byte header), u32 raw size."""
    import lz4.block

    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        pos = 0
        while len(buf) - pos >= 25:
            method = buf[pos + 16]
            compressed_size = int.from_bytes(buf[pos + 17:pos + 21], "little")
            raw_size = int.from_bytes(buf[pos + 21:pos + 25], "little")
            end = pos + 16 + compressed_size
            if compressed_size < 9:
                raise ClickHouseError.new("CANNOT_DECOMPRESS", "Compressed block size is too small")
            if len(buf) < end:
                break
            block = bytes(buf[pos + 16:end])
            expected = bytes(buf[pos:pos + 16])
            actual = native_checksum(block)
            if actual != expected:
                raise ClickHouseError.new(
                    "CHECKSUM_DOESNT_MATCH",
                    f"Checksum doesn't match: corrupted data. Reference: {expected.hex()}. "
                    f"Actual: {actual.hex()}. Size of compressed block: {compressed_size}")
            if method == NATIVE_LZ4:
                try:
                    yield lz4.block.decompress(block[9:], uncompressed_size=raw_size)
                except lz4.block.LZ4BlockError as e:
                    raise ClickHouseError.new("CANNOT_DECOMPRESS", f"Cannot decompress LZ4 block: {e}")
            elif method == NATIVE_NONE:
                yield block[9:]
            else:
                raise ClickHouseError.new(
                    "UNKNOWN_COMPRESSION_METHOD",
                    f"Unknown compression method {method:#x} (the local ClickHouse server decodes "
                    "LZ4 and uncompressed blocks)")
            pos = end
        del buf[:pos]
    if buf:
        raise ClickHouseError.new("CANNOT_DECOMPRESS", "Request body ends inside a compressed block")


def native_compress(data: bytes) -> bytes:
    import lz4.block

    out = []
    for off in range(0, len(data), MAX_BODY_CHUNK):
        raw = data[off:off + MAX_BODY_CHUNK]
        payload = lz4.block.compress(raw, store_size=False)
        block = (bytes([NATIVE_LZ4]) + (len(payload) + 9).to_bytes(4, "little")
                 + len(raw).to_bytes(4, "little") + payload)
        out.append(native_checksum(block) + block)
    return b"".join(out)


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """Fields of a multipart/form-data body (the crate's `.param()` requests)."""
    boundary = None
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ClickHouseError.new("BAD_ARGUMENTS", "multipart/form-data request without a boundary")
    fields: dict[str, bytes] = {}
    delimiter = b"--" + boundary.encode()
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if value.endswith(b"\r\n"):
            value = value[:-2]
        name = filename = None
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                for item in line.split(";")[1:]:
                    key, _, val = item.strip().partition("=")
                    if key.lower() == "name":
                        name = val.strip('"')
                    elif key.lower() == "filename":
                        filename = val.strip('"')
        if name is None:
            continue
        if filename is not None or not (name == "query" or name.startswith("param_")):
            raise ClickHouseError.new(
                "NOT_IMPLEMENTED",
                f"External data (multipart field {name!r}) is not supported by the local "
                "ClickHouse server; only `query` and `param_*` fields are")
        fields[name] = value
    return fields


# ---------------------------------------------------------------------------------------------
# The engine: chdb connections in a pool (one running statement per connection, pitfall 3) and
# in sessions.
# ---------------------------------------------------------------------------------------------

def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Conn:
    """One chdb connection: its own session context (settings, current database) over the
    process-wide engine."""

    def __init__(self, chdb, path: str):
        self.raw = chdb.connect(path)
        self.database = "default"
        self.broken = False

    def run(self, sql: str, fmt: str = "TabSeparated", params: Optional[dict] = None):
        try:
            return self.raw.query(sql, fmt, params=params or {})
        except RuntimeError as e:
            raise ClickHouseError.from_engine(e) from None

    def use(self, database: str) -> None:
        if database != self.database:
            self.run("USE " + quote_identifier(database))
            self.database = database

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:
            log.debug("closing a chdb connection failed", exc_info=True)


class Pool:
    def __init__(self, factory: Callable[[], Conn], size: int):
        self.factory = factory
        self.size = size
        self.idle: list[Conn] = []
        self.open = 0
        self.cond = threading.Condition()

    def acquire(self) -> Conn:
        deadline = time.monotonic() + POOL_WAIT_SECONDS
        with self.cond:
            while not self.idle and self.open >= self.size:
                left = deadline - time.monotonic()
                if left <= 0 or not self.cond.wait(left):
                    raise ClickHouseError.new(
                        "TOO_MANY_SIMULTANEOUS_QUERIES",
                        f"All {self.size} engine connections stayed busy for {POOL_WAIT_SECONDS:.0f} s "
                        "(raise --pool-size)")
            if self.idle:
                return self.idle.pop()
            self.open += 1
        try:
            return self.factory()
        except BaseException:
            with self.cond:
                self.open -= 1
                self.cond.notify()
            raise

    def release(self, conn: Conn, discard: bool = False) -> None:
        if discard:
            conn.close()
        with self.cond:
            if discard:
                self.open -= 1
            else:
                self.idle.append(conn)
            self.cond.notify()

    def close_all(self) -> None:
        with self.cond:
            idle, self.idle = self.idle, []
            self.open -= len(idle)
        for conn in idle:
            conn.close()


@dataclass
class Session:
    conn: Conn
    timeout: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)


class Sessions:
    """`session_id=`: a dedicated connection whose SET/USE/temporary tables persist between
    requests, closed after `session_timeout` seconds unused (as upstream, default 60 s)."""

    def __init__(self, factory: Callable[[], Conn]):
        self.factory = factory
        self.items: dict[str, Session] = {}
        self.lock = threading.Lock()

    def acquire(self, session_id: str, timeout: float, check: bool) -> Session:
        while True:
            with self.lock:
                session = self.items.get(session_id)
                if session is None:
                    if check:
                        raise ClickHouseError.new("SESSION_NOT_FOUND", f"Session {session_id} not found")
                    session = Session(self.factory(), timeout)
                    self.items[session_id] = session
            # A client that sends its next request as soon as it has read the previous answer
            # can arrive while that request's thread is still releasing the session: wait a
            # moment before calling it concurrent use.
            if not session.lock.acquire(timeout=2.0):
                raise ClickHouseError.new(
                    "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client")
            with self.lock:
                current = self.items.get(session_id) is session
            if current:
                session.timeout = timeout
                return session
            # Closed or expired while we waited: look it up again.
            session.lock.release()

    def release(self, session_id: str, session: Session, close: bool) -> None:
        session.last_used = time.monotonic()
        if close:
            with self.lock:
                if self.items.get(session_id) is session:
                    del self.items[session_id]
            session.conn.close()
        session.lock.release()

    def expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            for sid, session in list(self.items.items()):
                if now - session.last_used > session.timeout and session.lock.acquire(blocking=False):
                    del self.items[sid]
                    session.conn.close()
                    session.lock.release()

    def close_all(self) -> None:
        with self.lock:
            sessions, self.items = list(self.items.values()), {}
        for session in sessions:
            session.conn.close()


class Engine:
    def __init__(self, data_dir: str, pool_size: int):
        self.data_dir = os.path.abspath(data_dir)
        self.pool_size = pool_size

    def start(self) -> None:
        global ENGINE_VERSION, VERSION_SUFFIX
        os.makedirs(self.data_dir, exist_ok=True)
        from chdb import _chdb  # the engine alone: chdb's pandas/pyarrow helpers are not installed

        self.chdb = _chdb
        # Kept open for the server's lifetime so the engine (shared by all connections of the
        # process) stays up while pool connections come and go.
        self.anchor = Conn(_chdb, self.data_dir)
        row = self.anchor.run("SELECT version(), timezone()").bytes().decode().strip().split("\t")
        ENGINE_VERSION, self.timezone = row[0], row[1]
        VERSION_SUFFIX = f"(version {ENGINE_VERSION} (chdb))"
        names = self.anchor.run(
            "SELECT number, errorCodeToName(number) FROM numbers(2000) "
            "WHERE errorCodeToName(number) != ''").bytes().decode()
        for line in names.splitlines():
            code, name = line.split("\t")
            ERROR_NAMES[int(code)] = name
            ERROR_CODES[name] = int(code)
        self.pool = Pool(self.new_conn, self.pool_size)
        self.sessions = Sessions(self.new_conn)

    def new_conn(self) -> Conn:
        try:
            return Conn(self.chdb, self.data_dir)
        except RuntimeError as e:
            raise ClickHouseError.from_engine(e) from None

    def close(self) -> None:
        self.sessions.close_all()
        self.pool.close_all()
        self.anchor.close()


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------

class ClientGone(Exception):
    """The client closed the connection while we were answering."""


class Output:
    """Writes one HTTP response: the whole body at once, or streamed with chunked encoding.

    Compression follows upstream: a Content-Encoding only when the request enabled
    `enable_http_compression` and accepts it; `compress=1` wraps the body in native LZ4 blocks.
    """

    def __init__(self, handler: "Handler", encoding: Optional[str], native: bool):
        self.handler = handler
        self.sock: socket.socket = handler.connection
        self.encoding = encoding
        self.native = native
        self.chunked = False
        self.started = False
        self._zlib = None
        if encoding in ("gzip", "deflate"):
            self._zlib = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)

    def _send(self, *parts: bytes) -> None:
        # One sendmsg for header, payload and trailer: no copy of large chunks, no tiny packets.
        views = [memoryview(p) for p in parts if p]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while sent and views:
                    if sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except OSError as e:  # BrokenPipe, ConnectionReset, timeout
            self.handler.close_connection = True
            raise ClientGone(str(e)) from None

    def _encode(self, data: bytes, final: bool = False) -> bytes:
        if self.native and data:
            data = native_compress(data)
        if self.encoding == "lz4":
            import lz4.frame
            # Each piece is a whole LZ4 frame: the crate decodes concatenated frames, and a
            # streamed exception block then arrives as a chunk of its own.
            return lz4.frame.compress(data) if data else b""
        if self._zlib is not None:
            out = self._zlib.compress(data)
            return out + self._zlib.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
        return data

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        self.handler.status = status
        reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {reason}", f"Date: {self.handler.date_time_string()}"]
        if self.handler.close_connection:
            lines.append("Connection: Close")
        else:
            lines.append("Connection: Keep-Alive")
            lines.append(f"Keep-Alive: timeout={Handler.timeout}")
        if self.encoding:
            lines.append(f"Content-Encoding: {self.encoding}")
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_full(self, status: int, headers: list[tuple[str, str]], body: bytes,
                  head_only: bool = False) -> None:
        body = self._encode(body, final=True)
        self.started = True
        head = self._head(status, headers + [("Content-Length", str(len(body)))])
        self._send(head, b"" if head_only else body)

    def start_stream(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        if self.handler.request_version == "HTTP/1.0":
            self.handler.close_connection = True  # body ends when the connection closes
            self._send(self._head(status, headers))
        else:
            self.chunked = True
            self._send(self._head(status, headers + [("Transfer-Encoding", "chunked")]))

    def write(self, data: bytes) -> None:
        data = self._encode(data)
        if not data:
            return
        if self.chunked:
            self._send(b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._send(data)

    def end(self) -> None:
        tail = self._encode(b"", final=True) if self._zlib is not None else b""
        if tail:
            self.write_raw(tail)
        if self.chunked:
            self._send(b"0\r\n\r\n")

    def write_raw(self, data: bytes) -> None:
        if self.chunked:
            self._send(b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._send(data)

    def write_exception(self, err: ClickHouseError, tag: str) -> None:
        """ClickHouse 25.11+'s in-band exception block, which the crate recognises at the end of
        a chunk: `\\r\\n__exception__\\r\\nTAG\\r\\n<message>\\n<len> TAG\\r\\n__exception__\\r\\n`,
        where len counts the message and its newline. The connection stays usable (pitfall 5)."""
        message = (err.text + "\n").encode()
        block = (b"\r\n__exception__\r\n" + tag.encode() + b"\r\n" + message
                 + str(len(message)).encode() + b" " + tag.encode() + b"\r\n__exception__\r\n")
        self.write(block)


def summary_header(read_rows=0, read_bytes=0, written_rows=0, written_bytes=0, result_rows=0,
                   result_bytes=0, elapsed=0.0) -> tuple[str, str]:
    values = {
        "read_rows": read_rows, "read_bytes": read_bytes, "written_rows": written_rows,
        "written_bytes": written_bytes, "total_rows_to_read": read_rows,
        "result_rows": result_rows, "result_bytes": result_bytes,
        "elapsed_ns": int(elapsed * 1e9),
    }
    return "X-ClickHouse-Summary", json.dumps({k: str(v) for k, v in values.items()},
                                               separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    params: dict[str, str]
    settings: list[tuple[str, str]]
    query_params: dict[str, str]
    database: Optional[str]
    default_format: str
    query_id: str


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, engine: Engine, verbose: bool):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.engine = engine
        self.verbose = verbose
        self.hostname = socket.gethostname()
        self.inflight = 0
        self.inflight_cond = threading.Condition()
        self.stopping = False


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive and body-read timeout, as upstream's keep_alive_timeout/http_receive_timeout.
    timeout = 30
    server: Server

    def setup(self) -> None:
        super().setup()
        # Responses are written in pieces (headers, chunk frames); without this Nagle's
        # algorithm and delayed ACKs add ~40 ms to small responses.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args) -> None:
        if self.server.verbose:
            log.info("%s %s", self.address_string(), fmt % args)

    def send_error(self, code, message=None, explain=None) -> None:
        """Protocol-level errors from http.server (bad request line, oversized headers, unknown
        method) in ClickHouse's shape instead of an HTML page."""
        self.close_connection = True
        name = {501: "NOT_IMPLEMENTED", 503: "ABORTED"}.get(code, "BAD_ARGUMENTS")
        err = ClickHouseError.new(name, f"HTTP {code}: {message or explain or 'bad request'}")
        body = (err.text + "\n").encode()
        try:
            self.wfile.write(
                (f"HTTP/1.1 {code} {self.responses.get(code, ('',))[0]}\r\nConnection: Close\r\n"
                 f"Content-Type: text/plain; charset=UTF-8\r\nX-ClickHouse-Exception-Code: {err.code}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body)
        except OSError:
            pass

    # Every method goes through one entry point; unsupported ones get a ClickHouse-style error.
    def do_GET(self):
        self._entry()

    do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _entry(self) -> None:
        with self.server.inflight_cond:
            if self.server.stopping:  # a keep-alive connection asking after shutdown began
                self.send_error(503, "the server is shutting down")
                return
            self.server.inflight += 1
        started = time.monotonic()
        self.status = 0
        try:
            self._handle()
        finally:
            with self.server.inflight_cond:
                self.server.inflight -= 1
                self.server.inflight_cond.notify_all()
            if self.server.verbose:
                path = self.path if len(self.path) < 300 else self.path[:300] + "..."
                log.info("%s %s -> %s in %.1f ms", self.command, path, self.status or "-",
                         (time.monotonic() - started) * 1000)

    def _handle(self) -> None:
        url = urlsplit(self.path)
        params: dict[str, str] = {}
        pairs = parse_qsl(url.query, keep_blank_values=True)
        for key, value in pairs:
            params[key] = value
        out = Output(self, None, False)
        body = None
        try:
            body = BodyReader(self.rfile, self.headers)
            path = url.path.rstrip("/") or "/"
            if path in ("/ping", "/replicas_status") and self.command in ("GET", "HEAD"):
                body.drain()
                out.send_full(200, [("Content-Type", "text/html; charset=UTF-8")], b"Ok.\n",
                              head_only=self.command == "HEAD")
            elif path != "/":
                body.drain()
                text = (f"There is no handle {url.path}\n\nUse / or /ping for health checks.\n"
                        "Send queries with POST / or GET /?query=...\n"
                        "(local ClickHouse server over chdb: the /play and /dashboard UIs are not "
                        "available)\n")
                out.send_full(404, [("Content-Type", "text/plain; charset=UTF-8")], text.encode())
            elif self.command == "OPTIONS":
                body.drain()
                out.send_full(204, [("Access-Control-Allow-Origin", "*"),
                                    ("Access-Control-Allow-Methods", "POST, GET, OPTIONS"),
                                    ("Access-Control-Allow-Headers",
                                     "origin, x-requested-with, x-clickhouse-format, "
                                     "x-clickhouse-user, x-clickhouse-key, Authorization"),
                                    ("Access-Control-Max-Age", "86400")], b"")
            elif self.command not in ("GET", "POST", "HEAD"):
                raise ClickHouseError.new(
                    "NOT_IMPLEMENTED",
                    f"HTTP method {self.command} is not supported; use GET or POST")
            elif self.command in ("GET", "HEAD") and "query" not in params and body.done:
                out.send_full(200, [("Content-Type", "text/html; charset=UTF-8")], b"Ok.\n",
                              head_only=self.command == "HEAD")
            else:
                out = self._output_for(params)
                self._query(params, body, out)
        except ClientGone:
            self.close_connection = True
        except ClickHouseError as err:
            self._fail(out, body, err)
        except Exception as exc:  # a bug here must still produce an answer, not a dropped socket
            log.error("internal error: %s", traceback.format_exc())
            self._fail(out, body, ClickHouseError.new("STD_EXCEPTION", f"{type(exc).__name__}: {exc}"))
        finally:
            if body is not None and not body.done:
                # Unread body bytes would be parsed as the next request: drop the connection.
                self.close_connection = True

    def _output_for(self, params: dict[str, str]) -> Output:
        encoding = None
        if params.get("enable_http_compression", "0").lower() in ("1", "true"):
            accepted = [e.split(";")[0].strip().lower()
                        for e in self.headers.get("Accept-Encoding", "").split(",")]
            for candidate in ("gzip", "deflate", "lz4"):
                if candidate in accepted:
                    encoding = candidate
                    break
        return Output(self, encoding, params.get("compress") == "1")

    def _fail(self, out: Output, body: Optional[BodyReader], err: ClickHouseError) -> None:
        if out.started:
            # Only reachable for errors between a response's start and its first chunk.
            self.close_connection = True
            return
        if body is not None:
            body.drain()  # pitfall 6: the crate only shows our message if we read its whole body
            if body.broken:
                self.close_connection = True
        if self.server.verbose:
            log.info("error: %s", err.text)
        try:
            out.send_full(err.http_status, [
                ("Content-Type", "text/plain; charset=UTF-8"),
                ("X-ClickHouse-Server-Display-Name", self.server.hostname),
                ("X-ClickHouse-Exception-Code", str(err.code)),
            ], (err.text + "\n").encode(), head_only=self.command == "HEAD")
        except ClientGone:
            self.close_connection = True

    # -- queries --------------------------------------------------------------------------------

    def _query(self, params: dict[str, str], body: BodyReader, out: Output) -> None:
        engine = self.server.engine
        query_params = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        settings = [(k, v) for k, v in params.items()
                    if k and k not in RESERVED_PARAMS and not k.startswith("param_")]
        for name, _ in settings:
            if not all(c in _WORD_CHARS for c in name) or name[0] not in _WORD_START:
                raise ClickHouseError.new("UNKNOWN_SETTING", f"Unknown setting '{name}'")
        req = Request(
            method=self.command,
            params=params,
            settings=settings,
            query_params=query_params,
            database=params.get("database") or self.headers.get("X-ClickHouse-Database") or None,
            default_format=(params.get("default_format") or self.headers.get("X-ClickHouse-Format")
                            or "TabSeparated"),
            query_id=params.get("query_id") or str(uuid.uuid4()),
        )

        url_query = params.get("query", "")
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/form-data"):
            fields = parse_multipart(body.read_all(), content_type)
            for name, value in fields.items():
                if name.startswith("param_"):
                    req.query_params[name[6:]] = value.decode("utf-8", "replace")
            form_query = fields.get("query", b"").decode("utf-8", "replace")
            url_query = url_query + ("\n" if url_query and form_query else "") + form_query
            data: Iterable[bytes] = iter(())
        else:
            data = body.chunks()
            decode = content_decoder(self.headers.get("Content-Encoding", ""))
            if decode is not None:
                data = decode(data)
            if params.get("decompress") == "1":
                data = native_decompress(data)

        # The SQL is the URL query, a newline, then the body (upstream's concatenation), read
        # only as far as needed to know whether it is an INSERT whose data follows.
        prefix = (url_query + "\n").encode() if url_query else b""
        buf = bytearray(prefix)
        data = iter(data)
        exhausted = False
        while True:
            shape = scan_insert(buf.decode("latin-1"), eof=exhausted)
            if shape is not NEED_MORE:
                break
            if len(buf) > MAX_INSERT_HEAD:
                shape = NOT_INSERT_WITH_DATA
                break
            chunk = next(data, None)
            if chunk is None:
                exhausted = True
            else:
                buf += chunk

        session_id = params.get("session_id")
        session = None
        if session_id:
            try:
                timeout = float(params.get("session_timeout") or 60)
            except ValueError:
                raise ClickHouseError.new("BAD_ARGUMENTS", "Invalid session timeout")
            session = engine.sessions.acquire(session_id, min(max(timeout, 0), 3600),
                                              params.get("session_check") == "1")
            conn = session.conn
        else:
            conn = engine.pool.acquire()
        discard = False
        try:
            home_db = conn.database
            try:
                self._prepare(conn, req)
                if isinstance(shape, InsertWithData):
                    if req.method in ("GET", "HEAD"):
                        raise ClickHouseError.new("READONLY", GET_IS_READONLY)
                    self._insert(conn, req, shape, buf, data, exhausted, out)
                else:
                    if not exhausted:
                        for chunk in data:
                            buf += chunk
                    try:
                        sql = bytes(buf).decode("utf-8")
                    except UnicodeDecodeError:
                        raise ClickHouseError.new(
                            "SYNTAX_ERROR",
                            "The request body is not UTF-8 SQL text. Binary bodies are accepted as "
                            "INSERT data only (`INSERT INTO t FORMAT <format>` in the URL or before "
                            "the data); compressed bodies need Content-Encoding or decompress=1")
                    discard = self._select_or_command(conn, req, sql, out)
            finally:
                if conn.broken or not self._reset(conn, req, session is not None, home_db):
                    discard = True
        except BaseException:
            discard = True
            raise
        finally:
            if session is not None:
                engine.sessions.release(session_id, session,
                                        close=discard or params.get("close_session") == "1")
            else:
                engine.pool.release(conn, discard)

    def _prepare(self, conn: Conn, req: Request) -> None:
        """Applies the request's database and settings to the connection (undone by _reset)."""
        if req.database:
            conn.use(req.database)
        elif conn.database != "default" and not req.params.get("session_id"):
            conn.use("default")
        if req.settings:
            conn.run("SET " + ", ".join(f"{k} = {quote_literal(v)}" for k, v in req.settings))

    def _reset(self, conn: Conn, req: Request, in_session: bool, home_db: str) -> bool:
        """Pitfall 4: URL settings are per query. Returns False if the connection cannot be
        brought back to defaults (e.g. after readonly=1) and must be discarded."""
        try:
            if req.settings:
                conn.run("SET " + ", ".join(f"{k} = DEFAULT" for k, _ in req.settings))
            if in_session and req.database and conn.database == req.database:
                conn.use(home_db)
            return True
        except ClickHouseError:
            return False

    def _headers(self, req: Request, fmt: Optional[str]) -> list[tuple[str, str]]:
        headers = [
            ("X-ClickHouse-Server-Display-Name", self.server.hostname),
            ("X-ClickHouse-Query-Id", req.query_id),
            ("X-ClickHouse-Timezone", self.server.engine.timezone),
        ]
        if fmt:
            headers += [("Content-Type", content_type_for(fmt)), ("X-ClickHouse-Format", fmt)]
        else:
            headers.append(("Content-Type", "text/plain; charset=UTF-8"))
        if req.params.get("add_http_cors_header", "0").lower() in ("1", "true"):
            headers.append(("Access-Control-Allow-Origin", "*"))
        return headers

    def _insert(self, conn: Conn, req: Request, shape: InsertWithData, buf: bytearray,
                data: Iterator[bytes], exhausted: bool, out: Output) -> None:
        started = time.monotonic()
        head = bytes(buf[:len(shape.head)]).decode("utf-8", "replace")
        inline = bytes(buf[shape.data_start:])
        # The body is spooled to a file and inserted with `FROM INFILE` rather than through
        # chdb's streaming insert (send_insert/insert_append/insert_done): that API reports
        # success when the table refuses the rows at write time (e.g. a violated CHECK
        # constraint, Code 469), so rows would vanish with a 200. FROM INFILE raises like the
        # real server. Memory stays flat: the body goes to disk chunk by chunk.
        with tempfile.NamedTemporaryFile(prefix="local-clickhouse-insert-") as spool:
            if inline:
                spool.write(inline)
            if not exhausted:
                for chunk in data:
                    spool.write(chunk)
            spool.flush()
            sql = f"{head} FROM INFILE '{spool.name}' FORMAT {shape.fmt}"
            try:
                result = conn.raw.query(sql, "TabSeparated")
            except RuntimeError as e:
                raise ClickHouseError.from_engine(e) from None
        out.send_full(200, self._headers(req, None) + [summary_header(
            written_rows=result.rows_written(), written_bytes=result.bytes_written(),
            elapsed=time.monotonic() - started)], b"", head_only=self.command == "HEAD")

    def _select_or_command(self, conn: Conn, req: Request, sql: str, out: Output) -> bool:
        """Runs a non-INSERT-with-data statement. Returns True if the connection must be
        discarded afterwards (its session state may have changed)."""
        started = time.monotonic()
        if not sql.strip():
            raise ClickHouseError.new("SYNTAX_ERROR", "Empty query")
        shape = analyze_query(sql)
        if shape.second_statement_at is not None:
            pos = shape.second_statement_at
            raise ClickHouseError.new(
                "SYNTAX_ERROR",
                f"Syntax error (Multi-statements are not allowed): failed at position {pos + 1} "
                f"(end of query): {sql[pos:pos + 64].strip()}. ")
        try:
            info = conn.raw.classify_query(sql)
        except Exception:
            info = None
        query_class = getattr(info.get("query_class"), "name", "") if info else ""
        if req.method in ("GET", "HEAD") and query_class in ("MUTATING", "MUTATING_GLOBAL"):
            raise ClickHouseError.new("READONLY", GET_IS_READONLY)
        # SET/USE statements and temporary tables belong to a session; outside one they would
        # leak into the next request on this pooled connection, so that connection is dropped.
        discard = not req.params.get("session_id") and (
            query_class == "CONTROL" or (shape.first_word, shape.second_word) == ("CREATE", "TEMPORARY"))
        fmt = shape.explicit_format or req.default_format
        head_only = self.command == "HEAD"
        wait_end = req.params.get("wait_end_of_query") == "1"

        stream = None
        if shape.first_word in ("SELECT", "WITH", "(") and is_streamable(fmt):
            try:
                stream = conn.raw.send_query(sql, fmt, params=req.query_params)
            except RuntimeError as e:
                if "Streaming query is not supported" not in str(e):
                    raise ClickHouseError.from_engine(e) from None
        if stream is None:
            res = conn.run(sql, fmt, req.query_params)
            payload = res.bytes()
            if shape.first_word == "USE":  # a session's current database changed
                conn.database = conn.run("SELECT currentDatabase()").bytes().decode().strip()
            out.send_full(200, self._headers(req, fmt) + [summary_header(
                read_rows=res.rows_read(), read_bytes=res.bytes_read(),
                written_rows=res.rows_written(), written_bytes=res.bytes_written(),
                result_rows=res.rows_read(), result_bytes=len(payload),
                elapsed=time.monotonic() - started)], payload, head_only=head_only)
            return discard
        return self._stream(conn, req, stream, fmt, out, wait_end, head_only, started) or discard

    def _stream(self, conn: Conn, req: Request, stream, fmt: str, out: Output, wait_end: bool,
                head_only: bool, started: float) -> bool:
        """Streams a SELECT chunk by chunk. The first chunk is fetched before the headers go out,
        so errors found while planning still get a proper HTTP error status."""
        strip = HeaderStripper(fmt)
        finished = False

        def chunks() -> Iterator[bytes]:
            nonlocal finished
            first = True
            while True:
                try:
                    result = conn.raw.streaming_fetch_result(stream)
                except RuntimeError as e:
                    finished = True
                    raise ClickHouseError.from_engine(e) from None
                if result is None or result.rows_read() == 0:
                    finished = True
                    if first and result is not None:
                        yield strip(result.bytes())  # empty result: still send the header
                    return
                first = False
                yield strip(result.bytes())

        try:
            it = chunks()
            if wait_end or head_only:
                payload = b"".join(it)
                out.send_full(200, self._headers(req, fmt) + [summary_header(
                    elapsed=time.monotonic() - started)], payload, head_only=head_only)
                return False
            first = next(it, b"")
            tag = "".join(random.choices(string.ascii_lowercase, k=16))
            out.start_stream(200, self._headers(req, fmt) + [
                ("X-ClickHouse-Exception-Tag", tag), summary_header(elapsed=time.monotonic() - started)])
            out.write(first)
            try:
                for chunk in it:
                    out.write(chunk)
            except ClickHouseError as err:
                out.write_exception(err, tag)
            out.end()
            return False
        finally:
            if not finished:
                try:
                    conn.raw.streaming_cancel_query(stream)
                except Exception:
                    # The connection's state is unknown: make _query drop it.
                    conn.database = "?"
                    conn.broken = True


# ---------------------------------------------------------------------------------------------
# Process lifecycle
# ---------------------------------------------------------------------------------------------

def parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited but not yet reaped parent is a zombie: as good as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123, help="0 picks a free port")
    parser.add_argument("--data-dir", default="./data/clickhouse")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit cleanly once this process is gone (tests use their own pid)")
    parser.add_argument("--pool-size", type=int, default=16,
                        help="engine connections, i.e. statements running at once")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="local-clickhouse: %(message)s")
    started = time.monotonic()
    engine = Engine(args.data_dir, max(1, args.pool_size))
    # Bind first: a busy port fails in milliseconds, before the engine takes the data directory.
    try:
        server = Server((args.host, args.port), engine, args.verbose)
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
        return 2
    try:
        engine.start()
    except Exception as e:
        log.error("cannot open the engine on %s: %s", engine.data_dir, e)
        return 3

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def housekeeping() -> None:
        while not stop.wait(0.5):
            engine.sessions.expire()
            if args.parent_pid and not parent_alive(args.parent_pid):
                log.info("parent process %d is gone, stopping", args.parent_pid)
                stop.set()

    threading.Thread(target=housekeeping, name="housekeeping", daemon=True).start()
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                               name="accept", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    log.info("listening on %s:%d (ClickHouse %s via chdb, data in %s, ready in %.2f s)",
             host, port, ENGINE_VERSION, engine.data_dir, time.monotonic() - started)
    sys.stderr.flush()

    while not stop.wait(0.5):
        pass
    # Graceful stop: no new connections, let running statements finish (bounded), then close
    # the engine so it shuts down cleanly.
    server.shutdown()
    server.server_close()
    with server.inflight_cond:
        server.stopping = True
    deadline = time.monotonic() + 10
    with server.inflight_cond:
        while server.inflight and time.monotonic() < deadline:
            server.inflight_cond.wait(0.2)
    if server.inflight:
        log.info("%d requests still running after 10 s, stopping anyway", server.inflight)
        os._exit(1)
    engine.close()
    log.info("stopped")
    sys.stderr.flush()
    # Daemon threads may still sit in recv() on idle keep-alive sockets; don't wait for them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
