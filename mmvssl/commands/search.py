"""`mmvssl index build|add`, `mmvssl search` and `mmvssl serve`: searching your own videos (docs/search.md)."""

import json
from pathlib import Path

from ..errors import MmvsslError


def _print_build(counts: dict) -> None:
    print(f"indexed {counts['videos']} videos, {counts['windows']} windows ({counts['embedded_videos']} videos "
          f"embedded now, {counts['kept']} unchanged, {counts['dropped']} dropped, {counts['rejected']} rejected) "
          f"-> {counts['index']} (details in {Path(counts['index']) / 'build_report.json'})")


def _build(args) -> None:
    from ..search.index import build_index
    _print_build(build_index(args.model, args.input, args.out, window=args.window, stride=args.stride,
                             narrator=args.narrator, batch_size=args.batch_size, progress=not args.quiet))


def _add(args) -> None:
    from ..search.index import add_to_index
    _print_build(add_to_index(args.index, args.input, batch_size=args.batch_size, progress=not args.quiet))


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
    serve(args.index, host=args.host, port=args.port, model_dir=args.model, max_upload_mb=args.max_upload_mb)


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
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--model", default=None, help="the model folder (default: the one the index records)")
    v.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted query upload")
    v.set_defaults(func=_serve)
