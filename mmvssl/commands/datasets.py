"""`mmvssl datasets convert`: a public dataset's official annotation files -> captions.jsonl and
split lists for `shards build` (recipes in datasets/<name>/)."""


def _convert(args) -> None:
    from ..data.recipes import convert_dataset
    report = convert_dataset(args.name, args.annotations, args.out, videos=args.videos, relevancy=args.relevancy,
                             allow_pickle=args.allow_pickle, ego4d_alpha=args.ego4d_alpha)
    splits = ", ".join(f"{k} {v}" for k, v in report["splits"].items())
    print(f"{report['dataset']}: {report['entries']} entries" + (f" ({splits})" if splits else "")
          + (f", {report['downloads']} download rows" if report["downloads"] else "")
          + f", {report['num_problems']} problem rows -> {args.out} (details in convert_report.json)")
    for note in report["notes"]:
        print(f"  {note}")
    for p in report["problems"][:10]:
        where = f":{p['line']}" if "line" in p else (f" [{p['item']}]" if "item" in p else "")
        print(f"  {p['file']}{where}: {p['reason']} ({p['action']})")
    if report["num_problems"] > 10:
        print(f"  ... {report['num_problems'] - 10} more in convert_report.json")


def _wrap_audio(args) -> None:
    from ..data.recipes.media import wrap_audio_folder
    r = wrap_audio_folder(args.audio_dir, args.out, rate=args.rate)
    print(f"{r['found']} audio files: {r['written']} written, {r['already_there']} already there, "
          f"{len(r['failed'])} failed -> {args.out}")
    for item in r["failed"][:10]:
        print(f"  {item['file']}: {item['reason']}")


def _cut(args) -> None:
    from ..data.recipes.media import cut_clips
    r = cut_clips(args.captions, args.videos, args.out, fps=args.fps, short_side=args.short_side,
                  audio_rate=args.audio_rate)
    print(f"{r['clips']} clips: {r['written']} written, {r['already_there']} already there, "
          f"{len(r['failed'])} failed -> {args.out}")
    for item in r["failed"][:10]:
        print(f"  line {item['line']} ({item['id']}): {item['reason']}")


def register(sub) -> None:
    ds = sub.add_parser("datasets", help="dataset recipes").add_subparsers(dest="action", required=True)
    c = ds.add_parser("convert", help="official annotation files -> captions.jsonl + split lists for shards build")
    c.add_argument("name", help="howto100m, audioset, webvid, kinetics400/600/700, ego4d, ucf101, hmdb51, esc50, "
                                "msrvtt, youcook2, ek100-mir")
    c.add_argument("annotations", nargs="+", help="the official annotation file(s) or folder (see datasets/<name>/)")
    c.add_argument("--out", required=True, help="folder for captions.jsonl, captions_<split>.jsonl, splits/, report")
    c.add_argument("--videos", help="folder of downloaded videos: entries point at the files found there "
                                    "(official layout, file stem, or video2dataset's id); missing ones are reported")
    c.add_argument("--relevancy", help="ek100-mir: the official relevancy .pkl, converted once to relevancy.npz")
    c.add_argument("--allow-pickle", action="store_true",
                   help="ek100-mir: allow reading the relevancy pickle (numpy arrays only) for this one conversion")
    c.add_argument("--ego4d-alpha", type=float, help="ego4d: EgoVLP's window scale (default: the file's mean gap)")
    c.set_defaults(func=_convert)
    w = ds.add_parser("wrap-audio", help="audio files (ESC-50's WAVs) -> MP4 with a black picture, for shards build")
    w.add_argument("audio_dir")
    w.add_argument("--out", required=True, help="folder for <same relative path>.mp4")
    w.add_argument("--rate", type=int, default=44100, help="audio sample rate of the MP4 (ESC-50: 44100)")
    w.set_defaults(func=_wrap_audio)
    k = ds.add_parser("cut", help="cut the clips a converted captions.jsonl names (EK-100 MIR) out of the long videos")
    k.add_argument("captions", help="captions.jsonl from `datasets convert` (entries with clip and source_video)")
    k.add_argument("--videos", required=True, help="folder of the source videos (EK-100: P01/videos/P01_01.MP4 ...)")
    k.add_argument("--out", required=True, help="folder the entries' `video` paths are relative to")
    k.add_argument("--fps", type=int, default=30)
    k.add_argument("--short-side", type=int, default=256)
    k.add_argument("--audio-rate", type=int, default=48000)
    k.set_defaults(func=_cut)
