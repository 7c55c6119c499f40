"""`mmvssl serve`: a local web page to search an index and play the results.

The standard library's ThreadingHTTPServer is enough here: one user (or a few) on localhost, five
routes, no templates or sessions, and no new dependency to keep patched; a thread per request lets a
slow upload or a long video transfer run beside other queries (the model runs behind a lock).

Routes:
  GET  /, /app.js          the page (mmvssl/search/static/), fixed names only
  GET  /api/search?q=&k=   a text query -> JSON {"results": [...]}
  POST /api/search?kind=audio|video|image[&start=&end=&k=]   the file is the request body (at most
                           max_upload bytes, held in memory, decoded by PyAV / Pillow, never written
                           to disk nor executed) -> JSON
  GET  /thumb/<window id>  the window's JPEG thumbnail, from the database
  GET  /media/<root id>/<source>   a video of the indexed collection, with HTTP ranges (seeking)

Media are served only for a (root, source) pair that the index lists: the URL path is percent-decoded
once and looked up in the database, so `../`, absolute paths and encoded variants name no video and
get 404 without touching the filesystem; a listed file must still resolve (symlinks followed) inside
its root, else 404 too. Shard samples are read from the shard the index recorded, from the member's
offset (a range of a 200 MB member reads that range, not the member).

What a request must be (docs/search.md, "Security"); every refusal is one JSON line naming the limit:
  - Host one of the names the server was started for (127.0.0.1, localhost, [::1] and the --host value,
    with the port; more with --allow-host): a DNS-rebinding page's requests carry its own name;
  - no foreign Origin, and no Sec-Fetch-Site other than same-origin / none outside the page itself;
  - /api/ requests carry `X-Mmvssl: 1`, a header a page on another site cannot send without a CORS
    preflight (which this server never grants), so a cross-site form or <img> cannot run a query;
  - the request (line, headers, body) arrives within --timeout seconds, else the connection is
    closed (slowloris); at most --max-connections connections at once, at most --max-uploads
    uploads of at most --max-upload-mb held in memory at once;
  - query limits (span, text length, pixels) are the Searcher's (mmvssl/search/query.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import sqlite3
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..data.shardio import MemberLimits
from ..errors import MmvsslError, one_line
from . import limits as defaults

STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}
MEDIA_TYPES = {"mp4": "video/mp4", "m4v": "video/mp4", "webm": "video/webm", "mkv": "video/x-matroska",
               "mov": "video/quicktime", "avi": "video/x-msvideo"}
CSP = "default-src 'self'; img-src 'self'; media-src 'self'; style-src 'self' 'unsafe-inline'; object-src 'none'"
CHUNK = 1 << 16
API_HEADER = "X-Mmvssl"  # the page's fetches send `X-Mmvssl: 1`; a cross-site page cannot without a preflight
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
ID = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit SQLite's integer ('²'.isdigit() is True)


@dataclass(frozen=True)
class Limits:
    """What one server accepts; each is a `mmvssl serve` option (mmvssl/commands/search.py)."""
    max_upload: int = int(defaults.MAX_UPLOAD_MB * 1024 * 1024)  # bytes of one query upload (--max-upload-mb)
    max_uploads: int = defaults.MAX_UPLOADS          # uploads held in memory at once (--max-uploads)
    max_connections: int = defaults.MAX_CONNECTIONS  # connections open at once (--max-connections)
    timeout: float = defaults.TIMEOUT  # seconds to receive a request, and of socket inactivity (--timeout)


def resolve_media(searcher, root_id: str, source: str):
    """("file", path) or ("shard", shard path, member name) for a video the index lists, else None."""
    if not ID.fullmatch(root_id):
        return None
    with searcher.lock:
        row = searcher.db.execute("SELECT v.source, v.shard, v.member, r.path, r.kind FROM videos v JOIN roots r "
                                  "ON r.id = v.root_id WHERE v.root_id = ? AND v.source = ?",
                                  (int(root_id), source)).fetchone()
    if row is None:
        return None
    listed, shard, member, root, kind = row
    if kind == "shards":
        return ("shard", shard, member) if shard and member else None
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, listed))
    if os.path.commonpath([real_root, target]) != real_root or target == real_root or not os.path.isfile(target):
        return None  # a symlink swapped in after indexing that leads out of the collection
    return ("file", target)


def _quote(value: str, limit: int = 80) -> str:
    """A client's string, shortened, for a one-line message."""
    return repr(value[:limit] + ("..." if len(value) > limit else ""))


class Handler(BaseHTTPRequestHandler):
    server_version = "mmvssl-search"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002  quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

    # ---- connection: a deadline for receiving each request (the Watchdog enforces it)
    def setup(self) -> None:
        # socket inactivity, reads and writes: a second past the request deadline, so the Watchdog answers a
        # late request first; this bounds a client that stops reading a response
        self.timeout = self.server.limits.timeout + 1.0
        self.timed_out = False
        super().setup()

    def handle_one_request(self) -> None:
        self.timed_out, self.responded = False, False
        self.server.watchdog.arm(self)  # also bounds an idle keep-alive connection
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            self.server.watchdog.disarm(self)

    def parse_request(self) -> bool:
        if self.timed_out and not self.raw_requestline.endswith(b"\n"):  # the request line stopped half-way
            self.command, self.request_version, self.requestline = None, "HTTP/1.1", ""
            self._timeout_answer()
            return False
        if not super().parse_request():
            return False
        if self.timed_out:  # the headers stopped half-way
            self._timeout_answer()
            return False
        if self.command != "POST":  # a POST is received once its body is
            self.server.watchdog.disarm(self)
        return True

    def _timeout_answer(self) -> None:
        self.send_error(HTTPStatus.REQUEST_TIMEOUT,
                        f"request not received within {self.server.limits.timeout:g} s (--timeout)")

    # ---- responses
    def send_response(self, code, message=None) -> None:
        self.responded = True
        super().send_response(code, message)

    def send_error(self, code, message=None, explain=None) -> None:  # one JSON line, never an HTML page
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase}, {"Connection": "close"})

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value, extra: dict | None = None) -> None:
        self._send(status, json.dumps(value).encode(), "application/json", extra)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _not_found(self) -> None:
        self._error(HTTPStatus.NOT_FOUND, "not found")

    # ---- who may ask
    def _refusal(self, path: str) -> str | None:
        """Why this request is refused (one line), or None."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.hosts:
            return (f"Host {_quote(host)} is not a name this server was started for ({', '.join(self.server.names)}); "
                    f"add it with --allow-host")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() not in self.server.origins:
            return f"Origin {_quote(origin)} is not this server's page; cross-site requests are refused"
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none") and path not in PAGES:
            return f"a {_quote(site)} request (Sec-Fetch-Site) is refused; only this server's page may ask"
        if path.startswith("/api/") and self.headers.get(API_HEADER) != "1":
            return f"API requests need the header '{API_HEADER}: 1' (which a page on another site cannot send)"
        return None

    def _guarded(self, route) -> None:
        url = urlsplit(self.path)
        refusal = self._refusal(url.path)
        if refusal:
            self.close_connection = True
            return self._error(HTTPStatus.FORBIDDEN, refusal)
        try:
            route(url)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug: answer it rather than drop the connection
            self.log_error("internal error on %s: %r", self.path[:200], e)
            self.close_connection = True
            if not self.responded:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {one_line(e)[:200]}")

    # ---- routes
    def do_GET(self) -> None:  # noqa: N802
        self._guarded(self._get)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _get(self, url) -> None:
        path = url.path
        if path in PAGES:
            name, ctype = PAGES[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype, {"Content-Security-Policy": CSP})
        elif path == "/api/search":
            query = parse_qs(url.query)
            self._search(lambda s, k: s.query(text=query.get("q", [""])[0], k=k), query)
        elif path.startswith("/thumb/") and ID.fullmatch(path[7:]):
            self._thumb(int(path[7:]))
        elif path.startswith("/media/"):
            root_id, _, rest = path[7:].partition("/")
            found = resolve_media(self.server.searcher, root_id, unquote(rest))
            self._media(found) if found else self._not_found()
        else:
            self._not_found()

    def _post(self, url) -> None:
        if url.path != "/api/search":
            return self._not_found()
        query = parse_qs(url.query)
        kind = query.get("kind", [""])[0]
        if kind not in ("audio", "video", "image"):
            self.close_connection = True  # the body is not read
            return self._error(HTTPStatus.BAD_REQUEST, "kind must be audio, video or image")
        limit = self.server.limits.max_upload
        declared = (self.headers.get("Content-Length") or "").strip()
        if not re.fullmatch(r"[0-9]{1,18}", declared):
            self.close_connection = True
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required (a number of bytes)")
        length = int(declared)
        if length > limit:
            self.close_connection = True
            if length <= 4 * limit:  # read and dropped, so the client sees the answer instead of a reset;
                self._drain(length)  # a larger one is not read at all
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"upload of {length} bytes exceeds the limit of {limit} bytes (--max-upload-mb)")
        if not self.server.upload_slots.acquire(blocking=False):
            self.close_connection = True
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"{self.server.limits.max_uploads} uploads are in "
                               f"progress, the limit (--max-uploads); retry in a moment")
        try:
            data = self._read_body(length)  # in memory only
            if data is not None:
                self._search(lambda s, k: s.query(**{kind: data}, start=_number(query, "start", 0.0),
                                                  end=_number(query, "end", None), k=k), query)
        finally:
            self.server.upload_slots.release()

    def _read_body(self, length: int) -> bytearray | None:
        """The body, read in chunks as it arrives (never more than Content-Length); None once answered."""
        data = bytearray()
        while len(data) < length:
            chunk = self.rfile.read(min(CHUNK, length - len(data)))
            if not chunk:
                break
            data += chunk
        self.server.watchdog.disarm(self)
        if len(data) < length:
            self.close_connection = True
            if self.timed_out:
                self._timeout_answer()
            else:
                self._error(HTTPStatus.BAD_REQUEST, f"request body ended after {len(data)} of {length} bytes")
            return None
        return data

    def _drain(self, length: int) -> None:
        for offset in range(0, length, CHUNK):
            if not self.rfile.read(min(CHUNK, length - offset)):
                break

    def _search(self, run, query: dict) -> None:
        try:
            k = query.get("k", ["24"])[0]
            if not re.fullmatch(r"[0-9]{1,6}", k):
                raise MmvsslError(f"k must be a whole number of results (1 to 1000), got {_quote(k)}")
            results = run(self.server.searcher, int(k))
        except (MmvsslError, ValueError) as e:
            return self._error(HTTPStatus.BAD_REQUEST, one_line(e))
        except sqlite3.OperationalError as e:  # a writer holds the database longer than SQLite's wait
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"the index is being written ({e}); retry in a moment")
        self._json(HTTPStatus.OK, {"results": results})

    def _thumb(self, window_id: int) -> None:
        searcher = self.server.searcher
        with searcher.lock:
            row = searcher.db.execute("SELECT thumb FROM windows WHERE id = ?", (window_id,)).fetchone()
        if row is None or row[0] is None:
            return self._not_found()
        self._send(HTTPStatus.OK, bytes(row[0]), "image/jpeg")

    def _media(self, found: tuple) -> None:
        with contextlib.ExitStack() as stack:
            if found[0] == "shard":
                # read from the member's offset, as asked, never whole; a member over the size limit,
                # which the index scan refused too (a shard replaced since), is not served
                from ..data.shardio import MemberRefused, open_member
                try:
                    source, size = stack.enter_context(open_member(found[1], found[2], self.server.member_limits))
                except MemberRefused as e:
                    return self._error(HTTPStatus.FORBIDDEN, e.reason)  # the member, not the shard's path
                except (OSError, tarfile.TarError, KeyError):
                    return self._not_found()
                name = found[2]
            else:
                source = stack.enter_context(open(found[1], "rb"))
                size, name = os.fstat(source.fileno()).st_size, found[1]
            ctype = MEDIA_TYPES.get(name.rsplit(".", 1)[-1].lower(), "application/octet-stream")
            header = self.headers.get("Range")
            span = _byte_range(header, size)
            if span is None:
                self.close_connection = True
                return self._json(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                                  {"error": f"Range {_quote(header)} is not one satisfiable byte range of this "
                                            f"{size}-byte file"}, {"Content-Range": f"bytes */{size}"})
            lo, hi = span
            self.send_response(HTTPStatus.PARTIAL_CONTENT if header else HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(hi - lo))
            self.send_header("X-Content-Type-Options", "nosniff")
            if header:
                self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            source.seek(lo)
            left = hi - lo
            while left > 0:
                chunk = source.read(min(CHUNK, left))
                if not chunk:
                    self.close_connection = True  # the file shrank: the client sees a short body
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


def _number(query: dict, name: str, default):
    value = query.get(name, [None])[0]
    if value in (None, ""):
        return default
    try:
        return float(value[:64])  # past 64 characters it is not a time anyway
    except ValueError:
        raise MmvsslError(f"{name} must be a number of seconds, got {_quote(value)}") from None


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[lo, hi) of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range; the whole file without one;
    None (416) for anything else: several ranges, `bytes=-0`, a start past the end, unparsable."""
    if not header:
        return 0, size
    m = re.fullmatch(r"bytes=([0-9]{0,18})-([0-9]{0,18})", header.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:
        n = int(m[2])
        return (max(0, size - n), size) if 0 < n and size > 0 else None
    lo, hi = int(m[1]), (min(int(m[2]) + 1, size) if m[2] else size)
    return (lo, hi) if lo < size and lo < hi else None


class Watchdog(threading.Thread):
    """Ends the reading side of a connection whose request (line, headers, body) is not in within the
    timeout: a socket timeout alone restarts with every byte, so a client sending one byte every few
    seconds (slowloris) would hold its thread and buffer forever. The handler then answers 408 (or
    closes, when nothing came) and the connection ends."""

    def __init__(self, timeout: float):
        super().__init__(name="mmvssl-serve-watchdog", daemon=True)
        self.timeout, self.deadlines, self.lock = timeout, {}, threading.Lock()
        self.stopped = threading.Event()

    def arm(self, handler) -> None:
        with self.lock:
            self.deadlines[handler] = time.monotonic() + self.timeout

    def disarm(self, handler) -> None:
        with self.lock:
            self.deadlines.pop(handler, None)

    def run(self) -> None:
        while not self.stopped.wait(min(0.25, self.timeout / 4)):
            now = time.monotonic()
            with self.lock:
                late = [h for h, deadline in self.deadlines.items() if deadline <= now]
                for h in late:
                    del self.deadlines[h]
            for h in late:
                h.timed_out = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RD)  # a blocked read returns; writing still works


class SearchServer(ThreadingHTTPServer):
    # handler threads are joined at close (after their sockets are shut): a daemon thread still logging
    # to stderr while the interpreter exits aborts the process (SIGABRT) instead of exit code 130
    daemon_threads = False
    block_on_close = True
    member_limits: MemberLimits | None = None  # media from shards (--max-member-mb); None: the defaults
    request_queue_size = 128  # many clients connect at once; the default backlog of 5 drops their SYNs

    def __init__(self, address, searcher, limits: Limits, allow_hosts: tuple = (), verbose: bool = False):
        super().__init__(address, Handler)
        self.searcher, self.limits, self.verbose = searcher, limits, verbose
        self.names, self.hosts, self.origins = allowed_hosts(address[0], self.server_address[1], allow_hosts)
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        self.open_requests, self.open_lock = set(), threading.Lock()
        self.upload_slots = threading.BoundedSemaphore(limits.max_uploads)
        self.watchdog = Watchdog(limits.timeout)
        self.watchdog.start()

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            return self._refuse(request)
        with self.open_lock:
            self.open_requests.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(request)

    def _closed(self, request) -> None:
        with self.open_lock:
            self.open_requests.discard(request)
        self.slots.release()

    def _refuse(self, request) -> None:
        """Answer 503 at once, from the accepting thread, without reading the request, and close."""
        body = json.dumps({"error": f"too many connections: {self.limits.max_connections} are open, the limit "
                                    f"(--max-connections); retry in a moment"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                f"\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(head + body)  # a few hundred bytes: fits the socket buffer, never blocks
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Stop: end every open connection (a blocked read returns at once), then join the handlers;
        one busy with a query finishes it (bounded by the query limits)."""
        self.watchdog.stopped.set()
        with self.open_lock:
            requests = list(self.open_requests)
        for request in requests:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RD)
        super().server_close()


def _url_host(host: str) -> str:
    """An address as it appears in a URL or Host header: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host  # a name, a name:port, or already bracketed


def allowed_hosts(host: str, port: int, extra=()) -> tuple[list[str], set[str], set[str]]:
    """(names, Host header values, Origin values) this server answers: the loopback names, the address
    it listens on unless that is a wildcard, and `extra` (--allow-host; a name with or without port)."""
    names = list(LOOPBACK_NAMES)
    if host not in ("", "0.0.0.0", "::"):
        names.append(_url_host(host).lower())
    names += [_url_host(h.strip()).lower() for h in extra if h.strip()]
    names = list(dict.fromkeys(names))
    hosts = set()
    for name in names:
        has_port = re.search(r":[0-9]+$", name) and not name.endswith("]")
        hosts.add(name if has_port else f"{name}:{port}")
        if port == 80 and not has_port:
            hosts.add(name)
    origins = {f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")}
    return names, hosts, origins


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, port: int) -> str | None:
    """The warning `serve` prints when it listens beyond this machine, else None."""
    if is_loopback(host):
        return None
    return (f"mmvssl: warning: listening on {host or 'every address'}:{port}: anyone who can reach this machine can "
            f"search the index and download its videos and thumbnails, without authentication; browsers reach it "
            f"only by the names given with --allow-host (docs/search.md, Security)")


def make_server(index_dir: str, host: str = "127.0.0.1", port: int = 8000, model_dir: str | None = None,
                max_upload_mb: float = defaults.MAX_UPLOAD_MB, verbose: bool = False, *,
                max_uploads: int = defaults.MAX_UPLOADS, max_connections: int = defaults.MAX_CONNECTIONS,
                timeout: float = defaults.TIMEOUT, max_query_seconds: float = defaults.MAX_QUERY_SECONDS,
                max_text_chars: int = defaults.MAX_TEXT_CHARS, max_pixels: int | None = None,
                max_member_mb: float = 1024.0, allow_hosts=()) -> SearchServer:
    from .query import Searcher
    for name, value in (("--max-upload-mb", max_upload_mb), ("--max-uploads", max_uploads),
                        ("--max-connections", max_connections), ("--timeout", timeout),
                        ("--max-query-seconds", max_query_seconds), ("--max-text-chars", max_text_chars),
                        ("--max-pixels", max_pixels), ("--max-member-mb", max_member_mb)):
        if value is not None and not value > 0:
            raise MmvsslError(f"{name} must be > 0, got {value}")
    searcher = Searcher(index_dir, model_dir=model_dir, max_query_seconds=max_query_seconds,
                        max_text_chars=max_text_chars, max_pixels=max_pixels)
    limits = Limits(int(max_upload_mb * 1024 * 1024), int(max_uploads), int(max_connections), float(timeout))
    try:
        server = SearchServer((host, port), searcher, limits, tuple(allow_hosts), verbose)
        server.member_limits = MemberLimits(max_member_mb=float(max_member_mb))  # media from shards
        return server
    except OSError as e:
        raise MmvsslError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, model_dir: str | None = None,
          max_upload_mb: float = defaults.MAX_UPLOAD_MB, **limits) -> None:
    warning = exposure_warning(host, port)
    if warning:  # before listening, so it is seen even when the address is refused
        print(warning, file=sys.stderr)
    server = make_server(index_dir, host, port, model_dir, max_upload_mb, verbose=True, **limits)
    print(f"serving {index_dir} on http://{_url_host(host)}:{server.server_address[1]}/ (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        # Ctrl-C: close the sockets, join the handlers, then leave without the interpreter's teardown.
        # After a served audio or video query, native thread pools (FFmpeg's, through PyAV) sometimes
        # abort in their static destructors at exit ("terminate called without an active exception",
        # SIGABRT instead of 130); the index is only read, so nothing is left to write or flush.
        server.server_close()
        print("mmvssl: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    finally:
        server.server_close()
