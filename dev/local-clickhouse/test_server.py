"""Protocol tests for the local ClickHouse server (server.py).

Run with `scripts/local-clickhouse --pytest` (installs pytest into the project venv). Each test
module starts one server on a free port over a temporary directory; process-lifecycle tests
start their own.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import server as S  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, port: int | None = None, parent_pid: int | None = None):
        self.port = port or free_port()
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}.log"
        args = [sys.executable, str(HERE / "server.py"), "--port", str(self.port),
                "--data-dir", str(data_dir), "--parent-pid", str(parent_pid or os.getpid())]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if self.request("GET", "/ping")[2] == b"Ok.\n":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method, path, body=None, headers=None, conn=None):
        own = conn is None
        conn = conn or self.conn()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp, resp.read()
        finally:
            if own:
                conn.close()

    def query(self, sql: str, params=None, body=None, method="POST", conn=None, headers=None):
        """Sends `sql` in the URL (and `body` as data) or, without body, `sql` as the body."""
        params = dict(params or {})
        if body is None and method == "POST":
            path, payload = "/?" + urlencode(params), sql.encode()
        else:
            params["query"] = sql
            path, payload = "/?" + urlencode(params), body
        return self.request(method, path, payload, headers, conn)

    def ok(self, sql: str, **kw) -> bytes:
        status, resp, data = self.query(sql, **kw)
        assert status == 200, data
        return data

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("ch") / "data")
    yield server
    server.stop()


@pytest.fixture()
def db(srv, request):
    """A fresh database named after the test."""
    name = "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    srv.ok(f"DROP DATABASE IF EXISTS {name}")
    srv.ok(f"CREATE DATABASE {name}")
    return name


def assert_error(status, resp, body, code: int, http_status: int):
    assert status == http_status, (status, body)
    assert resp.getheader("X-ClickHouse-Exception-Code") == str(code)
    text = body.decode()
    assert text.startswith(f"Code: {code}. DB::Exception: "), text
    assert text.endswith(" (chdb))\n"), text  # like upstream's "(version X (official build))"


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

class TestScanner:
    def test_insert_with_format_in_url_query(self):
        text = "INSERT INTO t(a, b) FORMAT RowBinaryWithNamesAndTypes\n"
        shape = S.scan_insert(text, eof=False)
        assert isinstance(shape, S.InsertWithData)
        assert shape.head == "INSERT INTO t(a, b) "
        assert shape.fmt == "RowBinaryWithNamesAndTypes"
        assert shape.data_start == len(text)

    def test_values_and_inline_data(self):
        shape = S.scan_insert("insert into t values (1,'a'),(2,'b')", eof=True)
        assert (shape.head, shape.fmt) == ("insert into t ", "Values")
        shape = S.scan_insert("INSERT INTO t FORMAT CSV 1,2\n", eof=True)
        assert shape.fmt == "CSV" and "INSERT INTO t FORMAT CSV 1,2\n"[shape.data_start:] == "1,2\n"

    def test_keywords_inside_strings_parentheses_and_comments_do_not_count(self):
        text = "INSERT /* FORMAT x */ INTO t (`format`, values) -- VALUES\nSETTINGS a='FORMAT b' FORMAT TSV\n"
        shape = S.scan_insert(text, eof=True)
        assert shape.fmt == "TSV" and shape.data_start == len(text)

    def test_insert_select_and_other_statements_are_plain_queries(self):
        assert S.scan_insert("INSERT INTO t SELECT 1", eof=True) is S.NOT_INSERT_WITH_DATA
        assert S.scan_insert("SELECT 1 FORMAT CSV", eof=False) is S.NOT_INSERT_WITH_DATA

    def test_needs_more_text_when_the_head_is_cut(self):
        assert S.scan_insert("INSERT INTO t FORM", eof=False) is S.NEED_MORE
        assert S.scan_insert("INSERT INTO t FORMAT CSV", eof=False) is S.NEED_MORE
        assert S.scan_insert("INS", eof=False) is S.NEED_MORE

    def test_explicit_output_format(self):
        assert S.analyze_query("SELECT 1 FORMAT JSON").explicit_format == "JSON"
        assert S.analyze_query("SELECT 1 FORMAT JSON SETTINGS a=1").explicit_format == "JSON"
        assert S.analyze_query("SELECT format FROM t").explicit_format is None
        assert S.analyze_query("SELECT format('{}', 1)").explicit_format is None
        assert S.analyze_query("SELECT 'FORMAT CSV'").explicit_format is None

    def test_multi_statement_detection(self):
        assert S.analyze_query("SELECT 1; SELECT 2").second_statement_at == 8
        assert S.analyze_query("SELECT 1;").second_statement_at is None
        assert S.analyze_query("SELECT ';'").second_statement_at is None

    def test_header_lengths(self):
        rb = b"\x02\x01a\x01b\x06UInt64\x06String" + b"rest"
        assert S.header_length("RowBinaryWithNamesAndTypes", rb) == len(rb) - 4
        assert S.header_length("TSVWithNamesAndTypes", b"a\tb\nUInt8\tString\n1\tx\n") == 17
        assert S.header_length("CSVWithNames", b'"a\nb","c"\n1,2\n') == 10
        assert S.header_length("TSV", b"1\n") == 0


class TestNativeCompression:
    def test_round_trip(self):
        data = os.urandom(1000) + b"a" * 3_000_000
        assert b"".join(S.native_decompress([S.native_compress(data)])) == data

    def test_split_anywhere(self):
        data = b"hello world " * 100_000
        framed = S.native_compress(data)
        pieces = [framed[i:i + 777] for i in range(0, len(framed), 777)]
        assert b"".join(S.native_decompress(pieces)) == data

    def test_corruption_is_detected(self):
        framed = bytearray(S.native_compress(b"x" * 1000))
        framed[-1] ^= 1
        with pytest.raises(S.ClickHouseError) as e:
            list(S.native_decompress([bytes(framed)]))
        assert e.value.code == 40


# ---------------------------------------------------------------------------------------------
# HTTP protocol
# ---------------------------------------------------------------------------------------------

def test_ping_and_root(srv):
    for path in ("/ping", "/", "/replicas_status"):
        status, resp, body = srv.request("GET", path)
        assert (status, body) == (200, b"Ok.\n")
    status, resp, body = srv.request("HEAD", "/ping")
    assert status == 200 and body == b""


def test_get_query_and_formats(srv):
    assert srv.ok("SELECT 1", method="GET") == b"1\n"
    assert srv.ok("SELECT 1 AS x", method="GET", params={"default_format": "JSONEachRow"}) == b'{"x":1}\n'
    status, resp, body = srv.query("SELECT 1 AS x FORMAT CSVWithNames", method="GET")
    assert body == b'"x"\n1\n'
    assert resp.getheader("X-ClickHouse-Format") == "CSVWithNames"
    assert resp.getheader("Content-Type").startswith("text/csv")
    assert resp.getheader("X-ClickHouse-Query-Id")
    # JSON is not streamable: served whole, with its statistics.
    doc = json.loads(srv.ok("SELECT number FROM numbers(3) FORMAT JSON"))
    assert doc["rows"] == 3 and doc["data"][2]["number"] in (2, "2")


def test_query_in_url_and_body_are_concatenated(srv):
    assert srv.ok("SELECT 1 +", body=b" 2", method="POST") == b"3\n"


def test_keep_alive_connection_is_reused(srv):
    conn = srv.conn()
    for i in range(20):
        assert srv.query(f"SELECT {i}", conn=conn)[2] == f"{i}\n".encode()
    conn.close()


def test_errors_have_clickhouse_shape(srv):
    assert_error(*srv.query("SELEC 1"), code=62, http_status=400)
    assert_error(*srv.query("SELECT * FROM nope"), code=60, http_status=404)
    assert_error(*srv.query("SELECT 1", params={"database": "nope"}), code=81, http_status=404)
    assert_error(*srv.query("SELECT 1; SELECT 2"), code=62, http_status=400)
    assert_error(*srv.query(""), code=62, http_status=400)
    assert_error(*srv.query("SELECT 1", params={"no_such_setting": "1"}), code=115, http_status=404)
    # GET implies readonly, as on a real server.
    assert_error(*srv.query("CREATE TABLE x (a Int8) ENGINE = Memory", method="GET"),
                 code=164, http_status=500)


def test_unsupported_requests_get_a_clear_error_not_a_dropped_connection(srv):
    status, resp, body = srv.request("PUT", "/?query=SELECT+1", b"")
    assert_error(status, resp, body, code=48, http_status=501)
    status, resp, body = srv.request("GET", "/play")
    assert status == 404 and b"There is no handle /play" in body
    # A binary body that is not INSERT data (what some clients send with GET).
    assert_error(*srv.request("POST", "/", b"\x00\xff\xfe binary"), code=62, http_status=400)
    status, resp, body = srv.request("POST", "/?query=SELECT+1", b"x", {"Content-Encoding": "zstd"})
    assert_error(status, resp, body, code=89, http_status=500)
    status, resp, body = srv.request(
        "POST", "/", b"--b\r\nContent-Disposition: form-data; name=\"ext\"; filename=\"f\"\r\n\r\n1\r\n--b--\r\n",
        {"Content-Type": "multipart/form-data; boundary=b"})
    assert_error(status, resp, body, code=48, http_status=501)


def test_multipart_query_with_parameters(srv):
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"query\"\r\n\r\n"
            b"SELECT {a:UInt8} + {b:UInt8}, {s:String}\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"param_a\"\r\n\r\n2\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"param_b\"\r\n\r\n3\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"param_s\"\r\n\r\nit's\r\n"
            b"--XyZ--\r\n")
    status, resp, data = srv.request("POST", "/", body, {"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert (status, data) == (200, b"5\tit\\'s\n")
    # URL parameters work too.
    assert srv.ok("SELECT {a:UInt8} * 2", params={"param_a": "21"}) == b"42\n"


# ---------------------------------------------------------------------------------------------
# Inserts
# ---------------------------------------------------------------------------------------------

def make_table(srv, db):
    srv.ok(f"CREATE TABLE {db}.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id")


def rows(srv, db) -> bytes:
    return srv.ok(f"SELECT id, s FROM {db}.t ORDER BY id FORMAT CSV")


def test_insert_text_formats(srv, db):
    make_table(srv, db)
    srv.ok(f"INSERT INTO {db}.t FORMAT CSV", body=b'1,"a"\n2,"b"\n')
    srv.ok(f"INSERT INTO {db}.t FORMAT TSV", body=b"3\tc\n")
    srv.ok(f"INSERT INTO {db}.t FORMAT JSONEachRow", body=b'{"id": 4, "s": "d"}\n')
    srv.ok(f"INSERT INTO {db}.t VALUES", body=b"(5, 'e')")
    srv.ok(f"INSERT INTO {db}.t (id, s) VALUES (6, 'f'), (7, 'g')")
    srv.ok(f"INSERT INTO {db}.t FORMAT CSV\n8,h\n")  # statement and data in the body
    assert rows(srv, db) == b"".join(b'%d,"%s"\n' % (i, c.encode()) for i, c in zip(range(1, 9), "abcdefgh"))


def test_rows_the_table_refuses_at_write_time_are_an_error_not_a_silent_200(srv, db):
    # chdb's streaming insert API reports success when a CHECK constraint refuses the rows;
    # the server must answer with the error (and store nothing), as clickhouse-server does.
    srv.ok(f"CREATE TABLE {db}.c (s String, CONSTRAINT no_poison CHECK s != 'poison') "
           "ENGINE = MergeTree ORDER BY s")
    status, resp, body = srv.request("POST", f"/?query=INSERT%20INTO%20{db}.c%20FORMAT%20TSV",
                                     body=b"fine\npoison\n")
    assert_error(status, resp, body, 469, 500)
    assert srv.ok(f"SELECT count() FROM {db}.c") == b"0\n"


def test_insert_binary_formats_round_trip(srv, db):
    make_table(srv, db)
    srv.ok(f"INSERT INTO {db}.t SELECT number, toString(number) FROM numbers(100000)")
    for fmt in ("Native", "RowBinary", "RowBinaryWithNamesAndTypes", "Parquet"):
        data = srv.ok(f"SELECT id, s FROM {db}.t ORDER BY id FORMAT {fmt}")
        srv.ok(f"CREATE TABLE {db}.copy AS {db}.t")
        srv.ok(f"INSERT INTO {db}.copy FORMAT {fmt}", body=data)
        assert srv.ok(f"SELECT count(), sum(id) FROM {db}.copy") == b"100000\t4999950000\n", fmt
        srv.ok(f"DROP TABLE {db}.copy")


def test_insert_with_native_lz4_framing_and_content_encoding(srv, db):
    make_table(srv, db)
    csv = b"".join(b"%d,row%d\n" % (i, i) for i in range(50_000))
    framed = S.native_compress(csv)
    chunks = [framed[i:i + 4096] for i in range(0, len(framed), 4096)]
    conn = srv.conn()
    conn.request("POST", "/?" + urlencode({"query": f"INSERT INTO {db}.t FORMAT CSV", "decompress": "1"}),
                 body=iter(chunks), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    summary = json.loads(resp.getheader("X-ClickHouse-Summary"))
    resp.read()
    assert summary["written_rows"] == "50000"
    status, resp, body = srv.query(f"INSERT INTO {db}.t FORMAT CSV", body=gzip.compress(b"99999999,z\n"),
                                   headers={"Content-Encoding": "gzip"})
    assert status == 200, body
    assert srv.ok(f"SELECT count() FROM {db}.t") == b"50001\n"

    # A corrupted block: a ClickHouse error (after the whole body was read), and the same
    # keep-alive connection still works.
    bad = bytearray(framed)
    bad[len(bad) // 2] ^= 0xFF
    status, resp, body = srv.query(f"INSERT INTO {db}.t FORMAT CSV", params={"decompress": "1"},
                                   body=bytes(bad), conn=conn)
    assert_error(status, resp, body, code=40, http_status=500)
    assert srv.ok("SELECT 1", conn=conn) == b"1\n"
    assert srv.ok(f"SELECT count() FROM {db}.t") == b"50001\n"


def test_failed_insert_reads_the_whole_body_before_answering(srv, db):
    big = b"1,a\n" * 500_000
    conn = srv.conn()
    status, resp, body = srv.query(f"INSERT INTO {db}.nope FORMAT CSV", body=big, conn=conn)
    assert_error(status, resp, body, code=60, http_status=404)
    assert srv.ok("SELECT 2", conn=conn) == b"2\n"
    make_table(srv, db)
    status, resp, body = srv.query(f"INSERT INTO {db}.t FORMAT CSV", body=b"1,a\nnot-a-number,b\n")
    assert status == 400 and resp.getheader("X-ClickHouse-Exception-Code") in ("27", "6", "72")
    assert srv.ok(f"SELECT count() FROM {db}.t") == b"0\n"


# ---------------------------------------------------------------------------------------------
# Streaming reads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["TSVWithNames", "CSVWithNamesAndTypes", "JSONCompactEachRowWithNames"])
def test_streamed_text_headers_appear_once(srv, fmt):
    body = srv.ok(f"SELECT number AS n FROM numbers(300000) FORMAT {fmt}")
    lines = body.splitlines()
    header_lines = 2 if "AndTypes" in fmt else 1
    assert len(lines) == 300_000 + header_lines
    assert lines[header_lines:header_lines + 1] in ([b"0"], [b"[0]"])


def test_streamed_row_binary_is_byte_exact(srv):
    body = srv.ok("SELECT number FROM numbers(300000)", params={"default_format": "RowBinaryWithNamesAndTypes"})
    expected = b"\x01\x06number\x06UInt64" + b"".join(struct.pack("<Q", i) for i in range(300000))
    assert body == expected
    # An empty result still carries the header (the crate needs it with validation on).
    empty = srv.ok("SELECT number FROM numbers(0)", params={"default_format": "RowBinaryWithNamesAndTypes"})
    assert empty == b"\x01\x06number\x06UInt64"


def test_error_mid_stream_uses_the_tagged_exception_block(srv):
    conn = srv.conn()
    # Small blocks and a late error: the first rows are surely on the wire before it happens,
    # however loaded the machine is.
    status, resp, body = srv.query(
        "SELECT throwIf(number = 900000) FROM numbers(1000000) SETTINGS max_block_size = 1000",
        conn=conn)
    assert status == 200
    tag = resp.getheader("X-ClickHouse-Exception-Tag")
    assert tag and body.endswith(f" {tag}\r\n__exception__\r\n".encode())
    start = body.rindex(b"__exception__\r\n" + tag.encode() + b"\r\n")
    block = body[start:].split(b"\r\n", 2)[2][:-len(f" {tag}\r\n__exception__\r\n")]
    text, length = block.rsplit(b"\n", 1)
    assert text.startswith(b"Code: 395. DB::Exception:") and int(length) == len(text) + 1
    assert srv.ok("SELECT 3", conn=conn) == b"3\n"  # the connection stays usable


def test_wait_end_of_query_turns_late_errors_into_http_errors(srv):
    status, resp, body = srv.query("SELECT throwIf(number = 200000) FROM numbers(1000000)",
                                   params={"wait_end_of_query": "1"})
    assert_error(status, resp, body, code=395, http_status=500)


def test_response_compression_when_enabled(srv):
    import lz4.frame
    status, resp, body = srv.query("SELECT number FROM numbers(100000)",
                                   params={"enable_http_compression": "1"},
                                   headers={"Accept-Encoding": "lz4"})
    assert resp.getheader("Content-Encoding") == "lz4"
    expected = b"".join(b"%d\n" % i for i in range(100000))
    out, rest = b"", body
    while rest:  # one frame per chunk
        d = lz4.frame.LZ4FrameDecompressor()
        out += d.decompress(rest)
        rest = d.unused_data
    assert out == expected
    status, resp, body = srv.query("SELECT 1", params={"enable_http_compression": "1"},
                                   headers={"Accept-Encoding": "gzip"})
    assert gzip.decompress(body) == b"1\n"
    # Not enabled: plain, whatever the client accepts (the crate always sends lz4).
    status, resp, body = srv.query("SELECT 1", headers={"Accept-Encoding": "lz4"})
    assert resp.getheader("Content-Encoding") is None and body == b"1\n"


# ---------------------------------------------------------------------------------------------
# Settings, databases and sessions
# ---------------------------------------------------------------------------------------------

def settings_now(srv) -> bytes:
    return srv.ok("SELECT getSetting('max_result_rows'), getSetting('readonly'), currentDatabase()")


def test_url_settings_apply_to_one_query_only(srv, db):
    baseline = settings_now(srv)
    assert_error(*srv.query("SELECT number FROM numbers(100)",
                            params={"max_result_rows": "10", "result_overflow_mode": "throw"}),
                 code=396, http_status=500)
    assert srv.ok("SELECT getSetting('max_result_rows')", params={"max_result_rows": "7"}) == b"7\n"
    # readonly cannot be reset on a connection: the server must discard that connection.
    assert_error(*srv.query(f"CREATE TABLE {db}.x (a Int8) ENGINE = Memory", params={"readonly": "1"}),
                 code=164, http_status=500)
    assert srv.ok("SELECT currentDatabase()", params={"database": db}) == f"{db}\n".encode()
    # SET and USE statements outside a session do not leak either.
    srv.ok("SET max_result_rows = 5")
    srv.ok(f"USE {db}")
    srv.ok("CREATE TEMPORARY TABLE leak (a UInt8)")
    for _ in range(40):  # more than the pool size: every pooled connection is checked
        assert settings_now(srv) == baseline
        assert srv.ok("EXISTS TEMPORARY TABLE leak") == b"0\n"
    srv.ok(f"CREATE TABLE {db}.x (a Int8) ENGINE = Memory")


def test_sessions_keep_their_state(srv, db):
    sid = str(uuid.uuid4())
    srv.ok("SET max_result_rows = 5", params={"session_id": sid})
    srv.ok(f"USE {db}", params={"session_id": sid})
    srv.ok("CREATE TEMPORARY TABLE tmp (a UInt8)", params={"session_id": sid})
    srv.ok("INSERT INTO tmp VALUES (1), (2)", params={"session_id": sid})
    assert srv.ok("SELECT getSetting('max_result_rows'), currentDatabase(), (SELECT count() FROM tmp)",
                  params={"session_id": sid}) == f"5\t{db}\t2\n".encode()
    assert settings_now(srv).startswith(b"0\t0\tdefault")
    assert_error(*srv.query("SELECT 1", params={"session_id": "unknown", "session_check": "1"}),
                 code=372, http_status=500)
    srv.ok("SELECT 1", params={"session_id": sid, "close_session": "1"})
    assert srv.ok("SELECT getSetting('max_result_rows')", params={"session_id": sid}) == b"0\n"


# ---------------------------------------------------------------------------------------------
# Process lifecycle
# ---------------------------------------------------------------------------------------------

def test_sigterm_stops_cleanly_and_data_survives_sigkill(tmp_path):
    data = tmp_path / "data"
    server = Server(data)
    server.ok("CREATE TABLE t (a UInt64) ENGINE = MergeTree ORDER BY a")
    server.ok("INSERT INTO t SELECT number FROM numbers(1000)")
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server = Server(data, port=server.port)
    assert server.ok("SELECT count() FROM t") == b"1000\n"
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped" in server.log.read_text()
    server = Server(data)
    assert server.ok("SELECT count() FROM t") == b"1000\n"
    server.stop()


def test_server_exits_when_its_parent_is_gone(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    server = Server(tmp_path / "data", parent_pid=parent.pid)
    parent.kill()
    parent.wait()
    assert server.proc.wait(timeout=10) == 0
    assert "parent process" in server.log.read_text()


def test_busy_port_fails_fast(tmp_path, srv):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE / "server.py"), "--port", str(srv.port),
                           "--data-dir", str(tmp_path / "d")], capture_output=True, timeout=30)
    assert proc.returncode == 2 and b"cannot listen" in proc.stderr
    assert time.monotonic() - started < 5
