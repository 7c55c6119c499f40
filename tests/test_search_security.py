"""`mmvssl serve` against hostile and careless clients (issue 29): each finding reproduced against a
real server on 127.0.0.1 (make_server on an ephemeral port in a thread, and the `mmvssl serve` command
as a subprocess), with requests that end by themselves (client timeouts, small server limits)."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mmvssl.data.decode import DecodeError, decode_window, probe
from mmvssl.search.server import allowed_hosts, exposure_warning, make_server
from tests.conftest import make_video
from tests.test_search import index, models, videos  # noqa: F401  (module fixtures)

REPO = Path(__file__).resolve().parents[1]
API = {"X-Mmvssl": "1"}
TIMEOUT = 1.5        # the test servers' --timeout (seconds to send a request)
CONNECTIONS = 8      # their --max-connections
PIXELS = 10_000      # their --max-pixels: the indexed 96x80 clips pass, a 128x96 one does not


def start(index_dir, **limits):
    server = make_server(str(index_dir), port=0, **limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(index):  # noqa: F811
    server = start(index, max_upload_mb=0.5, max_uploads=2, max_connections=CONNECTIONS, timeout=TIMEOUT,
                   max_query_seconds=5.0, max_text_chars=200, max_pixels=PIXELS)
    yield server
    stop(server)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            host: str | None = None):
    """(status, parsed JSON or raw bytes, response); the path goes out exactly as written."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"127.0.0.1:{port}" if host is None else host)
    for k, v in {**(headers or {}), **({"Content-Length": str(len(body))} if body is not None else {})}.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body is not None:
        conn.send(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.getheader("Content-Type") == "application/json":
        data = json.loads(data)
    return response.status, data, response


def raw(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send bytes as they are and read until the server closes (or answers one response); b'' when
    the connection was dropped without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    return out


def one_line_error(data) -> str:
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert "\n" not in data["error"] and data["error"], data
    return data["error"]


# ---- who may ask

def test_only_its_own_host_names_and_origin_and_api_requests_need_the_header(served):
    port = served.server_address[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        assert request(port, "GET", "/", host=host)[0] == 200, host
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", ""):
        # DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends that name
        for path in ("/", "/api/search?q=a+circle", "/thumb/1", "/media/1/clip1.mp4"):
            status, data, _ = request(port, "GET", path, headers=API, host=host)
            assert status == 403 and "Host" in one_line_error(data) and "--allow-host" in data["error"], (host, path)
    # a cross-site form post (text/plain needs no preflight) is refused, with or without Origin
    clip = b"\x00" * 100
    status, data, _ = request(port, "POST", "/api/search?kind=video", body=clip,
                              headers={"Content-Type": "text/plain", "Origin": "http://attacker.example"})
    assert status == 403 and "Origin" in one_line_error(data)
    status, data, _ = request(port, "POST", "/api/search?kind=video", body=clip, headers={"Content-Type": "text/plain"})
    assert status == 403 and "X-Mmvssl: 1" in one_line_error(data)
    status, data, _ = request(port, "POST", "/api/search?kind=video", body=clip,
                              headers={**API, "Origin": "http://attacker.example"})
    assert status == 403 and "Origin" in one_line_error(data)
    status, data, _ = request(port, "GET", "/api/search?q=a+circle")  # what an <img> or a link sends
    assert status == 403 and "X-Mmvssl" in one_line_error(data)
    status, data, _ = request(port, "GET", "/thumb/1", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "Sec-Fetch-Site" in one_line_error(data)
    # the page's own requests: same origin, with the header
    status, data, _ = request(port, "GET", "/api/search?q=a+circle&k=3",
                              headers={**API, "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and len(data["results"]) == 3
    assert request(port, "GET", "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})[0] == 200
    # a CORS preflight is never granted, so a page elsewhere cannot add the header
    status, _, response = request(port, "OPTIONS", "/api/search",
                                  headers={"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "x-mmvssl"})
    assert status >= 400 and response.getheader("Access-Control-Allow-Origin") is None


def test_allowed_host_names():
    names, hosts, origins = allowed_hosts("0.0.0.0", 8000, ["box.lan", "proxy.example:443"])
    assert hosts == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000", "box.lan:8000", "proxy.example:443"}
    assert "http://box.lan:8000" in origins and "http://0.0.0.0:8000" not in origins
    assert allowed_hosts("10.1.2.3", 80)[1] >= {"10.1.2.3:80", "10.1.2.3", "localhost"}
    assert exposure_warning("127.0.0.1", 8000) is None and exposure_warning("localhost", 8000) is None
    for host in ("0.0.0.0", "10.1.2.3", "myhost", "::"):
        warning = exposure_warning(host, 8000)
        assert "without authentication" in warning and "\n" not in warning


# ---- query cost

def test_query_spans_numbers_and_text_length_are_bounded(served, videos):  # noqa: F811
    port = served.server_address[1]
    clip = (videos / "clips" / "clip3.mp4").read_bytes()
    for query, expected in (("end=inf", "finite"), ("end=nan", "finite"), ("start=-inf&end=1", "finite"),
                            ("end=1e7", "limit of 5 s (max_query_seconds)"), ("end=1e400", "finite"),
                            ("start=0&end=180", "limit of 5 s"), ("start=1e300&end=1e300", "empty"),
                            ("start=1e9&end=1000000001", "past the limit"), ("end=abc", "number of seconds"),
                            ("k=%C2%B2", "k must be"), ("k=" + "9" * 5000, "k must be"), ("k=1e9", "k must be")):
        for kind in ("audio", "video"):  # the limit's own message: refused before any decoding or encoding
            status, data, _ = request(port, "POST", f"/api/search?kind={kind}&{query}", body=clip, headers=API)
            assert status == 400 and expected in one_line_error(data), (kind, query, data)
    status, data, _ = request(port, "POST", "/api/search?kind=audio&start=2&end=3&k=3", body=clip, headers=API)
    assert status == 200 and data["results"][0]["video"] == "clip3.mp4"
    status, data, _ = request(port, "GET", "/api/search?q=" + "x" * 24_000, headers=API)  # refused before tokenizing
    assert status == 400 and "24000 characters exceeds the limit of 200 characters" in one_line_error(data)
    status, data, _ = request(port, "GET", "/api/search?k=2&q=" + "a+" * 100, headers=API)  # 200 characters
    assert status == 200 and len(data["results"]) == 2


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, at 89 M pixels
def test_decompression_bombs_are_refused_from_their_headers(served, tmp_path):
    from PIL import Image
    port = served.server_address[1]
    bomb = io.BytesIO()
    Image.new("1", (13000, 13000)).save(bomb, format="PNG")  # 169 million pixels in ~20 KB
    assert len(bomb.getvalue()) < 100_000
    status, data, _ = request(port, "POST", "/api/search?kind=image", body=bomb.getvalue(), headers=API)
    assert status == 400
    assert one_line_error(data) == f"query image: size 13000x13000 exceeds the limit of {PIXELS} pixels"
    small = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(small, format="PNG")
    status, data, _ = request(port, "POST", "/api/search?kind=image&k=2", body=small.getvalue(), headers=API)
    assert status == 200 and len(data["results"]) == 2
    big = make_video(tmp_path / "big.mp4", seconds=1.0, fps=5, size=(128, 96), audio_rate=None).read_bytes()
    status, data, _ = request(port, "POST", "/api/search?kind=video", body=big, headers=API)
    assert status == 400 and "frame size 128x96 exceeds the limit of 10000 pixels" in one_line_error(data)
    # decode_window checks the header as probe() does, with the same limit and message
    with pytest.raises(DecodeError) as by_probe:
        probe(big, max_pixels=PIXELS)
    with pytest.raises(DecodeError) as by_decode:
        decode_window(big, 0.0, 2, 2.0, max_pixels=PIXELS)
    assert str(by_decode.value) == str(by_probe.value) == "frame size 128x96 exceeds the limit of 10000 pixels"
    assert decode_window(big, 0.0, 2, 2.0, max_pixels=128 * 96).frames.shape == (2, 96, 128, 3)


# ---- connections

def _hold(port: int, data: bytes) -> socket.socket:
    # a server that never closes it fails the test by this socket's timeout; the bounds on when it closed
    # (TIMEOUT + 30) leave room for a loaded machine: the server's deadline is TIMEOUT
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT + 40)
    s.sendall(data)
    return s


def _until_closed(s: socket.socket) -> tuple[bytes, float]:
    """What the server sent before closing, and when it closed (monotonic)."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out, time.monotonic()


def test_slow_clients_are_closed_after_the_timeout_and_connections_are_bounded(served):
    port = served.server_address[1]
    post = (f"POST /api/search?kind=video HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Mmvssl: 1\r\n"
            f"Content-Length: 400000\r\n\r\nabc").encode()
    t0 = time.monotonic()
    held = [_hold(port, post) for _ in range(2)]  # the two upload slots, each waiting for its body
    held += [_hold(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
             for _ in range(CONNECTIONS - 3)]  # headers that never end
    time.sleep(0.3)
    # a third upload: no slot for its body
    status, data, _ = request(port, "POST", "/api/search?kind=video", body=b"\x00" * 1000, headers=API)
    assert status == 503 and "the limit (--max-uploads)" in one_line_error(data)
    held.append(_hold(port, b"G"))  # the last slot (the request above has closed)
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:  # one more: refused at once
        answer = _until_closed(extra)[0]
    assert answer.startswith(b"HTTP/1.1 503 ") and b"(--max-connections)" in answer
    results = [_until_closed(s) for s in held]
    for s in held:
        s.close()
    for (answer, closed) in results:
        assert closed - t0 < TIMEOUT + 30, closed - t0
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    bodies = [a for a, _ in results[:2]]
    assert all(b"within 1.5 s (--timeout)" in b for b in bodies), bodies
    # the slots are free again
    assert request(port, "GET", "/api/search?q=circle&k=1", headers=API)[0] == 200


def test_a_request_sent_byte_by_byte_is_closed_after_the_timeout(served):
    """One byte every 0.3 s: each arrives well within a socket timeout, the request never does."""
    import select
    port = served.server_address[1]
    text = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode() + b"a" * 200
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT + 40)
    t0, answer = time.monotonic(), None
    try:
        for n in range(len(text)):
            if select.select([s], [], [], 0)[0]:  # the server answered or closed
                break
            try:
                s.send(text[n:n + 1])
            except OSError:
                break
            time.sleep(0.3)
            if time.monotonic() - t0 > TIMEOUT + 30:
                break
        answer, closed = _until_closed(s)
    finally:
        s.close()
    assert closed - t0 < TIMEOUT + 30, closed - t0
    assert answer.startswith(b"HTTP/1.1 408 ") and b"within 1.5 s (--timeout)" in answer, answer[:200]



# ---- media ranges and ids

def test_ranges_and_ids_get_404_or_416_never_a_dropped_connection(served, videos):  # noqa: F811
    port = served.server_address[1]
    good = (videos / "clips" / "clip1.mp4").read_bytes()
    size = len(good)
    for header, expected in (("bytes=-5", good[-5:]), ("bytes=5-", good[5:]), ("bytes=0-0", good[:1]),
                             (f"bytes={size - 2}-{size * 9}", good[-2:]), (f"bytes=-{size * 2}", good)):
        status, data, response = request(port, "GET", "/media/1/clip1.mp4", headers={"Range": header})
        assert status == 206 and data == expected, header
    for header in ("bytes=-0", "bytes=0-1,4-5", "bytes=0-1, 4-5", f"bytes={size}-", "bytes=9-3", "bytes=-",
                   "bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 5000, "bytes=\u00b2-", "items=0-1", "bytes=0x10-"):
        status, data, response = request(port, "GET", "/media/1/clip1.mp4", headers={"Range": header})
        assert status == 416 and response.getheader("Content-Range") == f"bytes */{size}", header
        assert "not one satisfiable byte range" in one_line_error(data)
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    for path in (b"/thumb/\xb2", b"/thumb/\xc2\xb2", b"/thumb/" + b"9" * 5000, b"/thumb/-1", b"/thumb/%31",
                 b"/media/\xb2/clip1.mp4", b"/media/" + b"9" * 5000 + b"/clip1.mp4", b"/media/99999999999999999999/x",
                 b"/media/1/clip1.mp4%ff%fe"):
        answer = raw(port, b"GET " + path + b" HTTP/1.1\r\n" + host + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 404 "), (path[:40], answer[:80])
    answer = raw(port, b"GET /thumb/1 HTTP/1.1\r\n" + host + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"image/jpeg" in answer


def test_a_range_of_a_shard_member_reads_from_its_offset(models, videos, tmp_path):  # noqa: F811
    """Six 2-byte ranges of a 64 MB shard member: the old server read the member whole each time."""
    from mmvssl.data.shards import build_shards
    from mmvssl.search.index import build_index
    build_shards(videos / "clips", tmp_path / "shards", samples_per_shard=4)
    build_index(models["a"], str(tmp_path / "shards"), str(tmp_path / "idx"), window=1.0)
    shard = next((tmp_path / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:  # the same shard, its first video member now 64 MB
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    big = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "000000000.mp4":
                data, m.size = big, len(big)
            tar.addfile(m, io.BytesIO(data))
    server = start(tmp_path / "idx")
    port = server.server_address[1]
    try:
        tracemalloc.start()
        try:
            for offset in (0, 1000, 30 << 20, (64 << 20) - 2, 12345, 50 << 20):
                status, data, response = request(port, "GET", "/media/1/000000000",
                                                 headers={"Range": f"bytes={offset}-{offset + 1}"})
                assert status == 206 and data == big[offset:offset + 2]
                assert response.getheader("Content-Range") == f"bytes {offset}-{offset + 1}/{64 << 20}"
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, peak  # chunks of 64 KiB, never the member
        status, data, _ = request(port, "GET", "/media/1/000000001")
        assert status == 200 and data == (videos / "clips" / "clip1.mp4").read_bytes()
    finally:
        stop(server)


# ---- an index changed while it is served

def test_index_add_in_another_process_while_serving_is_picked_up(index, videos, tmp_path):  # noqa: F811
    served_index = tmp_path / "idx"
    shutil.copytree(index, served_index)
    server = start(served_index)
    port = server.server_address[1]
    try:
        status, data, _ = request(port, "GET", "/api/search?q=circle&k=100", headers=API)
        assert status == 200 and len(data["results"]) == 14
        more = tmp_path / "more"
        make_video(more / "new.mp4", seconds=2.0, fps=10, tone_hz=2000)
        make_video(more / "newer.mp4", seconds=3.0, fps=10, tone_hz=2500)
        add = subprocess.run([sys.executable, "-m", "mmvssl.cli", "index", "add", str(served_index), "--input",
                              str(more), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert add.returncode == 0, add.stderr[-2000:]
        status, data, _ = request(port, "GET", "/api/search?q=circle&k=100", headers=API)
        assert status == 200, data
        assert len(data["results"]) == 14 + 2 + 3
        assert {r["video"] for r in data["results"]} == {f"clip{i}.mp4" for i in range(4)} | {"new.mp4", "newer.mp4"}
        new = next(r for r in data["results"] if r["video"] == "newer.mp4")
        assert request(port, "GET", new["thumb"])[0] == 200
        status, body, _ = request(port, "GET", new["media"])
        assert status == 200 and body == (more / "newer.mp4").read_bytes()
        # the same folder again with one video changed: its windows are re-embedded under new ids
        make_video(more / "new.mp4", seconds=2.0, fps=10, size=(64, 64), tone_hz=3000)
        add = subprocess.run([sys.executable, "-m", "mmvssl.cli", "index", "add", str(served_index), "--input",
                              str(more), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert add.returncode == 0, add.stderr[-2000:]
        status, data, _ = request(port, "GET", "/api/search?q=circle&k=100", headers=API)
        assert status == 200 and len(data["results"]) == 14 + 2 + 3, data
        assert all(request(port, "GET", r["thumb"])[0] == 200 for r in data["results"])
        # its new sound (3000 Hz, no other clip has it) finds its own windows: the new vectors are served
        clip = (more / "new.mp4").read_bytes()
        status, data, _ = request(port, "POST", "/api/search?kind=audio&start=0&end=1&k=3", body=clip, headers=API)
        assert status == 200, data
        tied = [r for r in data["results"] if r["score"] > 0.9999]
        assert tied and all(r["video"] == "new.mp4" for r in tied) and 0.0 in [r["start"] for r in tied], data
    finally:
        stop(server)


# ---- the command

def test_the_serve_command_applies_its_limits_and_stops(index, tmp_path):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "mmvssl.cli", "serve", str(index), "--port", "0",
                             "--max-text-chars", "50", "--max-query-seconds", "3", "--timeout", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any("serving" in line for line in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        line = next(line for line in lines if "serving" in line)
        assert "warning" not in "".join(lines)  # 127.0.0.1: nothing exposed
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert request(port, "GET", "/", host="attacker.example")[0] == 403
        status, data, _ = request(port, "GET", "/api/search?k=2&q=a+red+circle", headers=API)
        assert status == 200 and len(data["results"]) == 2
        status, data, _ = request(port, "GET", "/api/search?q=" + "a" * 51, headers=API)
        assert status == 400 and one_line_error(data) == ("text query of 51 characters exceeds the limit of 50 "
                                                          "characters (max_text_chars)")
        status, data, _ = request(port, "POST", "/api/search?kind=audio&end=inf", body=b"\x00" * 10, headers=API)
        assert status == 400 and "finite" in one_line_error(data)
        status, data, _ = request(port, "POST", "/api/search?kind=audio&end=4", body=b"\x00" * 10, headers=API)
        assert status == 400 and "exceeds the limit of 3 s" in one_line_error(data)
        # sends nothing: closed by the server's 2 s deadline, long before this socket's own 60 s (a bound
        # for a loaded machine, not a timing: a server without the deadline holds it past 60 s)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            t0 = time.monotonic()
            assert _until_closed(s)[0] == b"" and time.monotonic() - t0 < 50
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        assert code == 130, (code, "".join(lines)[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # listening beyond this machine: warned before the address is even tried
    out = subprocess.run([sys.executable, "-m", "mmvssl.cli", "serve", str(tmp_path / "missing"), "--host", "0.0.0.0",
                          "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    warning, error = out.stderr.strip().splitlines()
    assert warning.startswith("mmvssl: warning: listening on 0.0.0.0:0") and "without authentication" in warning
    assert error.startswith("mmvssl: error: not a search index")


def test_windows_deleted_by_a_writer_still_running_are_left_out(index, tmp_path):  # noqa: F811
    """Mid-way through `index add` (state 'building'), a re-embedded video's old windows are gone from the
    database while the loaded faiss files still propose them: the query leaves them out (was a KeyError)."""
    import sqlite3
    from mmvssl.search import store
    from mmvssl.search.query import Searcher
    copy = tmp_path / "idx"
    shutil.copytree(index, copy)
    searcher = Searcher(str(copy))
    assert len(searcher.query(text="circle", k=100)) == 14
    db = sqlite3.connect(copy / store.DB_NAME)
    with db:  # what the writer has committed so far
        store.set_info(db, "state", "building")
        (video_id,) = db.execute("SELECT id FROM videos WHERE source = 'clip1.mp4'").fetchone()
        db.execute("DELETE FROM vectors WHERE window_id IN (SELECT id FROM windows WHERE video_id = ?)", (video_id,))
        db.execute("DELETE FROM windows WHERE video_id = ?", (video_id,))
        db.execute("DELETE FROM videos WHERE id = ?", (video_id,))
    db.close()
    results = searcher.query(text="circle", k=100)
    assert len(results) == 14 - 3 and "clip1.mp4" not in {r["video"] for r in results}
