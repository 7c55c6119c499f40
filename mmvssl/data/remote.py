"""Shards in object storage and on web servers: listing and opening `s3://`, `http(s)://` and
`pipe:` URLs, and publishing finished files to a bucket.

Remote files go through fsspec (s3fs for `s3://`, fsspec's aiohttp filesystem for
`http(s)://`): one file interface for every store, maintained with the PyData stack, and
botocore underneath s3fs reads the endpoint and credentials the way the `aws` tool does
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ~/.aws/config
and credentials). Nothing here takes or stores a credential, so none reaches a config, log,
report or checkpoint. `pipe:COMMAND` is webdataset's convention and opened by webdataset's gopen.

An S3 object is opened seekable (range reads), so a member over the size limit is passed by a
seek without reading it; an HTTP shard is read as one stream (servers need not honour ranges).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import sys
import tempfile
import time
import urllib.parse
from http import HTTPStatus
from pathlib import Path

from ..errors import MmvsslError

REMOTE_SCHEMES = ("s3://", "http://", "https://")
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)  # seconds between tries of a connection that failed
S3_BLOCK = 8 * 2**20  # read-ahead of a seekable S3 object
_sizes_cache: dict[str, dict | None] = {}
_told_sizes: set[str] = set()


def is_remote(url) -> bool:
    return str(url).startswith(REMOTE_SCHEMES)


def is_pipe(url) -> bool:
    return str(url).startswith("pipe:")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a remote URL; one cached instance per store."""
    import fsspec
    return fsspec.core.url_to_fs(url)


S3_REFUSALS = {"InvalidAccessKeyId": "no such access key", "SignatureDoesNotMatch": "the secret key is wrong",
               "AccessDenied": "these credentials may not read it"}


def _access_error(url: str, exn: Exception | str) -> MmvsslError:
    reason = " ".join(str(exn).split())[:200] or type(exn).__name__
    if reason in S3_REFUSALS:
        reason = f"{reason} ({S3_REFUSALS[reason]})"
    return MmvsslError(f"cannot access {url}: {reason}; check the credentials and endpoint "
                       f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, AWS_ENDPOINT_URL)")


def _is_access_failure(exn: Exception) -> bool:
    """A refusal of the credentials (as opposed to a missing object or a dropped connection)."""
    if isinstance(exn, PermissionError):
        return True
    name = type(exn).__name__
    return name in ("NoCredentialsError", "PartialCredentialsError", "ClientError") and (
        "Forbidden" in str(exn) or "AccessDenied" in str(exn) or "InvalidAccessKeyId" in str(exn)
        or "SignatureDoesNotMatch" in str(exn) or "credentials" in str(exn).lower())


def _transient(exn: Exception) -> bool:
    """A dropped or refused connection, a timeout: worth another try (not a missing object, not a
    refused credential)."""
    import aiohttp
    if isinstance(exn, FileNotFoundError) and exn.__cause__ is not None:
        return _transient(exn.__cause__)  # fsspec's HTTP info turns every failure into FileNotFoundError
    if isinstance(exn, aiohttp.ClientResponseError):
        return exn.status >= 500 or exn.status == 429  # 404, 403: the answer, not a failure
    if isinstance(exn, (FileNotFoundError, PermissionError)) or _is_access_failure(exn):
        return False
    if isinstance(exn, (OSError, TimeoutError)):
        return True
    from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    return isinstance(exn, (aiohttp.ClientError, BotoConnectionError, HTTPClientError))


def _retry_note(what: str, exn: Exception, attempt: int, delay: float) -> None:
    print(f"mmvssl: warning: {what}: {type(exn).__name__}; retry {attempt}/{len(RETRY_DELAYS)} in {delay:g} s",
          file=sys.stderr)


def _with_retries(what: str, call):
    """call() again after RETRY_DELAYS when the connection fails (a server restarting); a missing
    object or a refused credential is not retried."""
    for attempt, delay in enumerate((*RETRY_DELAYS, None)):
        try:
            return call()
        except Exception as exn:  # noqa: BLE001 - sorted by _transient
            if delay is None or not _transient(exn):
                raise
            _retry_note(redact(what), exn, attempt + 1, delay)
            time.sleep(delay)


def redact(url: str) -> str:
    """`url` without the parts that may hold a credential: `user:password@` and the query (a
    presigned URL's signature, a token), for messages; a URL without them is returned as it is."""
    parts = urllib.parse.urlsplit(str(url))
    if "@" not in parts.netloc and not parts.query:
        return str(url)
    netloc = ("…@" if "@" in parts.netloc else "") + parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def http_status(exn: BaseException | None) -> int | None:
    """The HTTP status of a refused request (fsspec's HTTP filesystem raises FileNotFoundError for
    every answer that is not 2xx, the aiohttp error with the status as its cause); None otherwise."""
    import aiohttp
    while exn is not None:
        if isinstance(exn, aiohttp.ClientResponseError):
            return exn.status
        exn = exn.__cause__
    return None


def describe_http_status(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _check_http(url: str) -> None:
    """One request for the first shard of an http(s) list: a refusal (401 / 403) or a server that
    cannot be reached stops the command at the start; a missing shard (404) is left to the reader,
    which reports and skips it."""
    fs, path = filesystem(url)
    try:
        _with_retries(url, lambda: fs.info(path))
    except Exception as exn:  # noqa: BLE001 - sorted by status below
        status = http_status(exn)
        if status == 404:
            return
        if status in (401, 403):
            raise MmvsslError(f"cannot access {redact(url)}: {describe_http_status(status)}: the server refused the "
                              f"request; give the URL the server expects (its token or signature) or ask its owner for "
                              f"read access") from None
        cause = describe_http_status(status) if status else " ".join(str(exn.__cause__ or exn).split())[:200]
        raise MmvsslError(f"cannot access {redact(url)}: {cause or type(exn).__name__}") from None


def check_access(url: str) -> None:
    """Stop at the start, with one line naming the URL and the cause (never a credential), when the
    store refuses the credentials (S3) or the request (HTTP 401 / 403)."""
    if url.startswith(("http://", "https://")):
        return _check_http(url)
    if not url.startswith("s3://"):
        return
    fs, path = filesystem(url)
    try:  # one HEAD (or a one-key listing for a prefix), however many objects the prefix holds
        _with_retries(url, lambda: fs.info(path.rstrip("/"), refresh=True))
    except FileNotFoundError:
        return  # a missing prefix: its shards are reported one by one when read
    except Exception as exn:  # noqa: BLE001 - botocore's errors have no common base worth naming
        code = _s3_refusal_code(fs, path) if _is_access_failure(exn) else None
        raise _access_error(url, code or exn) from None


def _s3_refusal_code(fs, path: str) -> str | None:
    """The S3 error code (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied) of a refused
    request. A HEAD's answer has no body, so a refused HEAD says only 'Forbidden': one listing of
    the bucket, whose answer names the code, is asked for once the HEAD has been refused."""
    from botocore.exceptions import ClientError
    try:
        fs.call_s3("list_objects_v2", Bucket=path.split("/", 1)[0], MaxKeys=1)
    except Exception as exn:  # noqa: BLE001 - only a better message is at stake
        while exn is not None and not isinstance(exn, ClientError):
            exn = exn.__cause__ or exn.__context__  # s3fs raises an OSError from botocore's ClientError
        return exn.response.get("Error", {}).get("Code") if exn is not None else None
    return None


def list_prefix(url: str) -> list[str]:
    """The *.tar objects under a bucket prefix (or matching a glob), as full URLs, sorted."""
    if not url.startswith("s3://"):
        raise MmvsslError(f"{url}: an HTTP server cannot be listed; name the shards with a brace "
                          f"pattern, e.g. https://host/path/shard-{{000000..000009}}.tar")
    check_access(url)
    fs, path = filesystem(url)
    pattern = path if any(c in path for c in "*?[") else path.rstrip("/") + "/*.tar"
    try:
        found = _with_retries(url, lambda: fs.glob(pattern, refresh=True))
    except Exception as exn:  # noqa: BLE001
        raise _access_error(url, exn) from None
    return sorted(f"s3://{p}" for p in found if p.endswith(".tar"))


def open_remote(url: str):
    """A binary file object of a remote shard: seekable for s3://, a stream for http(s)://.
    FileNotFoundError when it is not there; connection failures are retried with backoff."""
    fs, path = filesystem(url)
    if url.startswith("s3://"):
        return io.BufferedReader(_Resuming(url, lambda: fs.open(path, "rb", block_size=S3_BLOCK,
                                                                cache_type="readahead"), True), 2**20)
    return io.BufferedReader(_Resuming(url, lambda: fs.open(path, "rb", block_size=0), False), 2**20)


class _Resuming(io.RawIOBase):
    """A remote file that survives the server going away for a while: a read that fails on the
    connection waits (RETRY_DELAYS), opens the object again and goes on from the same byte (a seek
    on S3; an HTTP stream is read again up to there), so no member is lost or read twice.

    Seekable only for S3: fsspec's HTTP stream says it is seekable but refuses seeks, so it is
    shown as the stream it is and the tar is read in stream mode. Written here because fsspec
    retries neither a dropped stream nor (for HTTP) a refused connection."""

    def __init__(self, url: str, opener, seekable: bool):
        self.url, self.opener, self._seekable, self.pos = url, opener, seekable, 0
        self.f = _with_retries(url, opener)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("seek")
        self.pos = self._file().seek(offset, whence)
        return self.pos

    def _file(self):
        if self.f is None:
            self.f = self.opener()
            if self._seekable:
                self.f.seek(self.pos)
            else:
                left = self.pos
                while left:
                    chunk = self.f.read(min(left, 2**20))
                    if not chunk:
                        raise EOFError(f"{self.url} is shorter than before the retry")
                    left -= len(chunk)
        return self.f

    def readinto(self, buffer) -> int:
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            try:
                data = self._file().read(len(buffer))
                break
            except Exception as exn:  # noqa: BLE001 - sorted by _transient
                if delay is None or not _transient(exn):
                    raise
                _retry_note(f"{redact(self.url)} at byte {self.pos}", exn, attempt + 1, delay)
                self._drop()
                time.sleep(delay)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def _drop(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass
            self.f = None

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


def read_sizes(folder_url: str) -> dict | None:
    """sizes.json beside remote shards (read once per folder and process), None without one."""
    if folder_url not in _sizes_cache:
        sizes = None
        try:
            with open_remote(folder_url.rstrip("/") + "/sizes.json") as f:
                sizes = json.loads(f.read())
        except (OSError, ValueError):  # none, or unreadable: the shards are counted instead
            pass
        _sizes_cache[folder_url] = sizes if isinstance(sizes, dict) else None
    return _sizes_cache[folder_url]


def forget_sizes(folder_url: str) -> None:
    _sizes_cache.pop(folder_url, None)


def tell_sizes_missing(folder_url: str) -> None:
    """Once per folder and process: the sizes were counted by reading the shards; say how to save that."""
    if folder_url not in _told_sizes:
        _told_sizes.add(folder_url)
        print(f"mmvssl: note: no sizes.json beside {folder_url}/ (or it lacks these shards): samples counted "
              f"by reading the shards' headers; write it once with `mmvssl shards sizes {folder_url}/` so later runs start at once",
              file=sys.stderr)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return _with_retries(url, lambda: fs.exists(path))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return _with_retries(url, lambda: fs.cat_file(path))


def upload(local_path: str | os.PathLike, url: str) -> None:
    """Put a finished local file at `url`. One S3 PUT per object: the object appears whole or
    not at all, never half-written."""
    fs, path = filesystem(url)
    _with_retries(url, lambda: fs.put_file(str(local_path), path))
    fs.invalidate_cache(posixpath.dirname(path))


def upload_bytes(data: bytes, url: str) -> None:
    with tempfile.NamedTemporaryFile(prefix="mmvssl-upload-") as tmp:
        tmp.write(data)
        tmp.flush()
        upload(tmp.name, url)


def listing(folder_url: str) -> list[str]:
    """Names of the objects directly under a remote folder ([] when there is none)."""
    fs, path = filesystem(folder_url)
    try:
        return sorted(posixpath.basename(p.rstrip("/"))
                      for p in _with_retries(folder_url, lambda: fs.ls(path.rstrip("/"), detail=False, refresh=True)))
    except FileNotFoundError:
        return []


def remove(url: str) -> None:
    fs, path = filesystem(url)
    fs.rm_file(path)


class Staging:
    """A local folder standing in for an `s3://` output prefix: files are written there as in a
    local folder, and `publish` uploads each finished shard (then deletes the local copy) and then
    the small files, in the order given, so a report never names a shard not yet in the bucket.
    One PUT per object: nothing half-written is ever visible. `names`: what the prefix held."""

    def __init__(self, url: str):
        if not url.startswith("s3://"):
            raise MmvsslError(f"--out {url}: shards are written to a local folder or an s3:// prefix")
        self.url = url.rstrip("/")
        check_access(self.url + "/")
        self._tmp = tempfile.TemporaryDirectory(prefix="mmvssl-out-")
        self.folder = Path(self._tmp.name)
        self.names = set(listing(self.url))

    def fetch(self, name: str) -> bool:
        """Copy `name` from the prefix into the folder; False when the prefix has none."""
        if name not in self.names:
            return False
        (self.folder / name).write_bytes(read_bytes(f"{self.url}/{name}"))
        return True

    def remove(self, name: str) -> None:
        if name in self.names:
            remove(f"{self.url}/{name}")
            self.names.discard(name)

    def publish(self, shards, *then: str) -> None:
        for name in shards:
            local = self.folder / name
            if local.is_file():  # complete (renamed from .partial), not uploaded yet
                upload(local, f"{self.url}/{name}")
                local.unlink()
                self.names.add(name)
        for name in then:
            upload(self.folder / name, f"{self.url}/{name}")
            self.names.add(name)

    def close(self) -> None:
        self._tmp.cleanup()
