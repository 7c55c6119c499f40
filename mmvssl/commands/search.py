"""`mmvssl index build|add`, `mmvssl search` and `mmvssl serve`: searching your own videos (docs/search.md)."""

import json
from pathlib import Path

from ..errors import MmvsslError
from ..search import limits


def _print_build(counts: dict | None) -> None:
    if counts is None:  # not the main process of a torchrun launch: rank 0 prints
        return
    print(f"indexed {counts['videos']} videos, {counts['windows']} windows ({counts['embedded_videos']} videos "
          f"embedded now, {counts['kept']} unchanged, {counts['dropped']} dropped, {counts['rejected']} rejected) "
          f"-> {counts['index']} (details in {Path(counts['index']) / 'build_report.json'})")


def _build(args) -> None:
    """One process, or every process of `torchrun --nproc_per_node N -m mmvssl.cli index build ...`."""
    from ..data.workshare import Share
    from ..search.index import build_index
    with Share.from_env() as share:
        _print_build(build_index(args.model, args.input, args.out, window=args.window, stride=args.stride,
                                 narrator=args.narrator, batch_size=args.batch_size, progress=not args.quiet,
                                 share=share))


def _add(args) -> None:
    from ..data.workshare import Share
    from ..search.index import add_to_index
    with Share.from_env() as share:
        _print_build(add_to_index(args.index, args.input, batch_size=args.batch_size, progress=not args.quiet,
                                  share=share))


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise MmvsslError(f"{what} file not found: {path}")
    return Path(path).read_bytes()


def _search(args) -> None:
    from ..search.query import Searcher, format_table
    searcher = Searcher(args.index, model_dir=args.model, narration_weight=args.narration_weight)
    results = searcher.query(text=args.text, audio=_read(args.audio, "--audio"), video=_read(args.video, "--video"),
                             image=_read(args.image, "--image"), start=args.start, end=args.end, k=args.k)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results))


def _serve(args) -> None:
    from ..search.server import serve
    serve(args.index, host=args.host, port=args.port, model_dir=args.model, max_upload_mb=args.max_upload_mb,
          max_uploads=args.max_uploads, max_connections=args.max_connections, timeout=args.timeout,
          max_query_seconds=args.max_query_seconds, max_text_chars=args.max_text_chars, max_pixels=args.max_pixels,
          max_member_mb=args.max_member_mb, allow_hosts=args.allow_host)


def register(sub) -> None:
    index = sub.add_parser("index", help="build or extend a search index of your videos").add_subparsers(
        dest="action", required=True)
    b = index.add_parser("build", help="cut every video into windows and embed them (resumable)")
    b.add_argument("model", help="a trained model folder")
    b.add_argument("--input", required=True, help="a folder of videos, or shards (folder of .tar, pattern)")
    b.add_argument("--out", required=True, help="the index folder (re-running resumes and brings it up to date)")
    b.add_argument("--window", type=float, default=None, help="seconds per window (default: the model's clip)")
    b.add_argument("--stride", type=float, default=None, help="seconds between window starts (default: the window)")
    b.add_argument("--narrator", default=None, help="a narrator folder: store a pseudo-narration per window")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build)
    a = index.add_parser("add", help="take new videos into an existing index (its model and settings)")
    a.add_argument("index")
    a.add_argument("--input", required=True, help="a folder of videos, or shards")
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=_add)

    s = sub.add_parser("search", help="query a search index with text, a sound, a video clip or an image")
    s.add_argument("index")
    s.add_argument("text", nargs="?", default=None, help="a text query")
    s.add_argument("--audio", default=None, help="find windows that sound like this file")
    s.add_argument("--video", default=None, help="find windows that look like this clip")
    s.add_argument("--image", default=None, help="find windows that look like this image")
    s.add_argument("--start", type=float, default=0.0, help="query clip start (s) for --audio / --video")
    s.add_argument("--end", type=float, default=None, help="query clip end (s; default: start + the index window)")
    s.add_argument("-k", type=int, default=10, help="results to show")
    s.add_argument("--model", default=None, help="the model folder (default: the one the index records)")
    s.add_argument("--narration-weight", type=float, default=0.3, help="weight of the narrations in text queries")
    s.add_argument("--json", action="store_true", help="results as JSON")
    s.set_defaults(func=_search)

    v = sub.add_parser("serve", help="a local web page to search an index and play the results")
    v.add_argument("index")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; any "
                   "other exposes the collection without authentication, docs/search.md Security)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--model", default=None, help="the model folder (default: the one the index records)")
    v.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name (or name:port) the page is reached by, e.g. this machine's name with "
                        "--host 0.0.0.0 (repeatable; 127.0.0.1, localhost, [::1] and --host always are)")
    v.add_argument("--max-upload-mb", type=float, default=limits.MAX_UPLOAD_MB,
                   help="largest accepted query upload (default %(default)s)")
    v.add_argument("--max-uploads", type=int, default=limits.MAX_UPLOADS,
                   help="uploads held in memory at once (default %(default)s)")
    v.add_argument("--max-connections", type=int, default=limits.MAX_CONNECTIONS,
                   help="connections open at once (default %(default)s)")
    v.add_argument("--timeout", type=float, default=limits.TIMEOUT,
                   help="seconds a client has to send a request (headers and body), and of socket inactivity "
                        "(default %(default)s)")
    v.add_argument("--max-query-seconds", type=float, default=limits.MAX_QUERY_SECONDS,
                   help="longest audio / video query span (default %(default)s s)")
    v.add_argument("--max-text-chars", type=int, default=limits.MAX_TEXT_CHARS,
                   help="longest text query (default %(default)s characters)")
    v.add_argument("--max-pixels", type=int, default=None,
                   help="largest query image or video frame, width x height, checked before decoding "
                        "(default: the video decoder's limit, 4096 x 4096)")
    v.add_argument("--max-member-mb", type=float, default=1024.0,
                   help="largest shard member played from an indexed shard set (default %(default)s; streamed from "
                        "its offset either way)")
    v.set_defaults(func=_serve)
