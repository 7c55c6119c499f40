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
its root, else 404 too. Shard samples are read from the shard the index recorded.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import MmvsslError, one_line

STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8")}
MEDIA_TYPES = {"mp4": "video/mp4", "m4v": "video/mp4", "webm": "video/webm", "mkv": "video/x-matroska",
               "mov": "video/quicktime", "avi": "video/x-msvideo"}
CSP = "default-src 'self'; img-src 'self'; media-src 'self'; style-src 'self' 'unsafe-inline'; object-src 'none'"
CHUNK = 1 << 16


def resolve_media(searcher, root_id: str, source: str):
    """("file", path) or ("shard", shard path, member name) for a video the index lists, else None."""
    if not root_id.isdigit():
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


class Handler(BaseHTTPRequestHandler):
    server_version = "mmvssl-search"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002  quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

    # ---- responses
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

    def _json(self, status: int, value) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _not_found(self) -> None:
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    # ---- routes
    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        path = url.path
        if path in PAGES:
            name, ctype = PAGES[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype, {"Content-Security-Policy": CSP})
        elif path == "/api/search":
            query = parse_qs(url.query)
            self._search(lambda s, k: s.query(text=query.get("q", [""])[0], k=k), query)
        elif path.startswith("/thumb/") and path[7:].isdigit():
            self._thumb(int(path[7:]))
        elif path.startswith("/media/"):
            root_id, _, rest = path[7:].partition("/")
            found = resolve_media(self.server.searcher, root_id, unquote(rest))
            self._media(found) if found else self._not_found()
        else:
            self._not_found()

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/api/search":
            return self._not_found()
        query = parse_qs(url.query)
        kind = query.get("kind", [""])[0]
        if kind not in ("audio", "video", "image"):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "kind must be audio, video or image"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
        if length > self.server.max_upload or length < 0:
            self.close_connection = True
            if 0 < length <= 4 * self.server.max_upload:  # read and dropped, so the client sees the answer
                for offset in range(0, length, CHUNK):    # instead of a reset; a larger one is not read at all
                    self.rfile.read(min(CHUNK, length - offset))
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              {"error": f"upload of {length} bytes exceeds the limit of {self.server.max_upload}"})
        data = self.rfile.read(length)  # in memory only
        self._search(lambda s, k: s.query(**{kind: data}, start=_number(query, "start", 0.0),
                                          end=_number(query, "end", None), k=k), query)

    def _search(self, run, query: dict) -> None:
        try:
            k = int(query.get("k", ["24"])[0])
            results = run(self.server.searcher, k)
        except (MmvsslError, ValueError) as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": one_line(e)})
        self._json(HTTPStatus.OK, {"results": results})

    def _thumb(self, window_id: int) -> None:
        searcher = self.server.searcher
        with searcher.lock:
            row = searcher.db.execute("SELECT thumb FROM windows WHERE id = ?", (window_id,)).fetchone()
        if row is None or row[0] is None:
            return self._not_found()
        self._send(HTTPStatus.OK, bytes(row[0]), "image/jpeg")

    def _media(self, found: tuple) -> None:
        if found[0] == "shard":
            try:
                with tarfile.open(found[1]) as tar:
                    data = tar.extractfile(found[2]).read()
            except (OSError, tarfile.TarError, KeyError, AttributeError):
                return self._not_found()
            size, name = len(data), found[2]
        else:
            size, name, data = os.path.getsize(found[1]), found[1], None
        ctype = MEDIA_TYPES.get(name.rsplit(".", 1)[-1].lower(), "application/octet-stream")
        span = _byte_range(self.headers.get("Range"), size)
        if span is None:
            return self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", ctype, {"Content-Range": f"bytes */{size}"})
        lo, hi = span
        self.send_response(HTTPStatus.PARTIAL_CONTENT if self.headers.get("Range") else HTTPStatus.OK)
        self.send_header("Content-Type", ctype)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(hi - lo))
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        if data is not None:
            self.wfile.write(data[lo:hi])
            return
        with open(found[1], "rb") as f:
            f.seek(lo)
            left = hi - lo
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


def _number(query: dict, name: str, default):
    value = query.get(name, [None])[0]
    if value in (None, ""):
        return default
    try:
        return float(value)
    except ValueError:
        raise MmvsslError(f"{name} must be a number of seconds, got '{value}'") from None


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[lo, hi) of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range; the whole file without one."""
    if not header:
        return 0, size
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:
        return max(0, size - int(m[2])), size
    lo, hi = int(m[1]), (min(int(m[2]) + 1, size) if m[2] else size)
    return (lo, hi) if lo < size and lo < hi else None


class SearchServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connect at once; the default backlog of 5 drops their SYNs

    def __init__(self, address, searcher, max_upload: int, verbose: bool = False):
        super().__init__(address, Handler)
        self.searcher, self.max_upload, self.verbose = searcher, max_upload, verbose


def make_server(index_dir: str, host: str = "127.0.0.1", port: int = 8000, model_dir: str | None = None,
                max_upload_mb: float = 50.0, verbose: bool = False) -> SearchServer:
    from .query import Searcher
    searcher = Searcher(index_dir, model_dir=model_dir)
    try:
        return SearchServer((host, port), searcher, int(max_upload_mb * 1024 * 1024), verbose)
    except OSError as e:
        raise MmvsslError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, model_dir: str | None = None,
          max_upload_mb: float = 50.0) -> None:
    server = make_server(index_dir, host, port, model_dir, max_upload_mb, verbose=True)
    print(f"serving {index_dir} on http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
