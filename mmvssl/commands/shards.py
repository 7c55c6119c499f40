"""`mmvssl shards ...`: build, inspect and verify webdataset shards; add cached teacher features or
optical flow."""

import json
import os


def _build(args) -> None:
    from ..data.shards import build_shards
    report = build_shards(args.videos_dir, args.out, captions=args.captions,
                          samples_per_shard=args.samples_per_shard, progress=True, workers=args.workers,
                          short_side=args.short_side, fps=args.fps, clip_seconds=args.max_seconds,
                          overwrite=args.overwrite, max_pixels=args.max_pixels, max_seconds=args.max_duration,
                          check=args.check, max_member_mb=args.max_member_mb)
    total = report["num_accepted"] + report["num_rejected"]
    print(f"inputs {total}: accepted {report['num_accepted']}, rejected {report['num_rejected']} "
          f"-> {args.out} (details in {os.path.join(args.out, 'build_report.json')})")
    for item in report["rejected"][:10]:
        where = f" (line {item['line']})" if item.get("line") else ""
        print(f"  rejected {item['source']}{where}: {item['reason']}")


def _limits(args):
    from ..data.shardio import MemberLimits
    return MemberLimits(args.max_member_mb, args.max_text_member_mb)


def _inspect(args) -> None:
    from ..data.audit import contact_sheet, inspect_shards
    print(json.dumps(inspect_shards(args.shards, _limits(args)), indent=2))
    if args.sheet:
        rows = contact_sheet(args.shards, args.sheet, limits=_limits(args))
        print(f"contact sheet with {rows} samples -> {args.sheet}")


def _sizes(args) -> None:
    from ..data.shardio import write_sizes
    for folder, sizes in write_sizes(args.shards, _limits(args)).items():
        print(f"{len(sizes)} shards, {sum(sizes.values())} samples -> {folder}/sizes.json")


def _verify(args) -> None:
    from ..data.audit import verify_shards
    from ..errors import MmvsslError
    result = verify_shards(args.shards, limits=_limits(args))
    print(f"checked {result['checked']} samples ({result['without_video']} without video): "
          f"{len(result['failed'])} failed")
    for item in result["failed"]:
        print(f"  {item['shard']} {item['key']}: {item['reason']}")
    if result["failed"]:
        raise MmvsslError(f"{len(result['failed'])} samples failed to decode")


def _add_features(args) -> None:
    from ..teacher.features import add_teacher_features, parse_teacher_spec
    arch, pretrained, image_size = parse_teacher_spec(args.teacher)
    report = add_teacher_features(arch, pretrained, args.shards, args.out, fps=args.fps, size=args.size,
                                  image_size=args.image_size or image_size, batch_size=args.batch_size,
                                  device=args.device, overwrite=args.overwrite, progress=True)
    if not _is_main():  # under torchrun every process returns the same report: rank 0 tells it
        return
    shards = report["shards"]
    skipped = [(name, item) for name, r in shards.items() for item in r["skipped"]]
    print(f"teacher {report['teacher']['arch']} ({report['teacher']['pretrained']}, "
          f"{report['teacher']['image_size']} px, D={report['teacher']['embed_dim']}) at {report['settings']['fps']:g} "
          f"frames/s: {len(shards)} shards ({len(report['done_before'])} finished before), "
          f"{sum(r['samples'] for r in shards.values())} samples, {sum(r['frames'] for r in shards.values())} "
          f"frames, {len(skipped)} skipped -> {args.out} (details in {os.path.join(args.out, 'features_report.json')})")
    for name, item in skipped[:10]:
        print(f"  skipped {name} {item['key']}: {item['reason']}")


def _add_flow(args) -> None:
    from ..data.add_flow import add_flow
    report = add_flow(args.shards, args.out, algorithm=args.algorithm, fps=args.fps, size=args.size, clip=args.clip,
                      overwrite=args.overwrite, progress=True)
    if not _is_main():
        return
    shards = report["shards"]
    skipped = [(name, item) for name, r in shards.items() for item in r["skipped"]]
    s = report["settings"]
    print(f"flow {s['algorithm']} at {s['fps']:g} frames/s, {s['size']} px short side: {len(shards)} shards "
          f"({len(report['done_before'])} finished before), {sum(r['samples'] for r in shards.values())} samples, "
          f"{sum(r['frames'] for r in shards.values())} frames, {len(skipped)} skipped -> {args.out} "
          f"(details in {os.path.join(args.out, 'flow_report.json')})")
    for name, item in skipped[:10]:
        print(f"  skipped {name} {item['key']}: {item['reason']}")


def _is_main() -> bool:
    from ..data.workshare import Share
    return Share.from_env().is_main


def _limit_flags(parser) -> None:
    from ..data.shardio import MemberLimits
    parser.add_argument("--max-member-mb", type=float, default=MemberLimits.max_member_mb,
                        help="refuse (unread) shard members larger than this, from the tar header "
                             "(data.max_member_mb when training)")
    parser.add_argument("--max-text-member-mb", type=float, default=MemberLimits.max_text_member_mb,
                        help="the same for .json / .txt / .cls members (data.max_text_member_mb)")


def register(sub) -> None:
    shards = sub.add_parser("shards", help="webdataset shards").add_subparsers(dest="action", required=True)
    b = shards.add_parser("build", help="videos + captions.jsonl/csv -> tar shards, sizes.json, build_report.json")
    b.add_argument("videos_dir")
    b.add_argument("--captions", default=None, help="captions.jsonl or .csv (default: every video in the folder)")
    b.add_argument("--out", required=True)
    b.add_argument("--samples-per-shard", type=int, default=256)
    b.add_argument("--workers", type=int, default=1, help="processes probing / re-encoding inputs")
    b.add_argument("--short-side", type=int, default=None, help="re-encode: shorter side in pixels")
    b.add_argument("--fps", type=float, default=None, help="re-encode: constant frame rate")
    b.add_argument("--max-seconds", type=float, default=None,
                   help="re-encode: cut longer videos into consecutive clips of this length (narrations re-timed)")
    b.add_argument("--max-pixels", type=int, default=4096 * 2160, help="reject larger frames (from the header)")
    b.add_argument("--max-duration", type=float, default=4 * 3600.0, help="reject longer videos (seconds)")
    b.add_argument("--check", choices=["full", "first-frame"], default="full",
                   help="full: decode every video packet to catch truncated files")
    b.add_argument("--overwrite", action="store_true", help="rebuild instead of resuming an earlier build")
    b.add_argument("--max-member-mb", type=float, default=1024.0,
                   help="reject video files larger than this (shard readers refuse larger members: data.max_member_mb)")
    b.set_defaults(func=_build)
    i = shards.add_parser("inspect", help="counts, hours, distributions; --sheet writes a contact sheet PNG")
    i.add_argument("shards")
    i.add_argument("--sheet", default=None)
    _limit_flags(i)
    i.set_defaults(func=_inspect)
    z = shards.add_parser("sizes", help="count the samples of every shard and write sizes.json beside them "
                          "(local or s3://), so readers need not count them")
    z.add_argument("shards")
    _limit_flags(z)
    z.set_defaults(func=_sizes)
    v = shards.add_parser("verify", help="decode every sample and list the failures")
    v.add_argument("shards")
    _limit_flags(v)
    v.set_defaults(func=_verify)
    f = shards.add_parser("add-features", help="cache a frozen image teacher's per-frame features in new shards "
                                               "(train with teacher.cached=true)")
    f.add_argument("teacher", metavar="TEACHER_SPEC",
                   help="ARCH[:PRETRAINED]: an open_clip model name, hf-hub:org/repo or a model-config JSON, then a "
                        "weights tag or a local checkpoint file (ViT-B-32:openai, tiny.json:tiny.pt); or an "
                        "experiment config YAML, whose teacher.arch / teacher.pretrained / teacher.image_size are used")
    f.add_argument("--shards", required=True, help="input shards (folder, brace pattern or glob)")
    f.add_argument("--out", required=True, help="folder for the new shards (same names), sizes.json and "
                                                "features_report.json; re-running resumes")
    f.add_argument("--fps", type=float, default=4.0, help="cached frames per second over the whole video (frame "
                                                         "times 0, 1/F, 2/F, ...); training pairs each sampled "
                                                         "frame with the nearest cached time")
    f.add_argument("--size", type=int, default=0, help="decode frames (centre crop) at this size before the "
                                                       "teacher's resize; 0: the teacher's image size; data.size "
                                                       "gives exactly the online teacher's input")
    f.add_argument("--image-size", type=int, default=0, help="teacher.image_size (0: the teacher's own)")
    f.add_argument("--batch-size", type=int, default=64, help="frames per teacher call")
    f.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available; bf16 on GPU)")
    f.add_argument("--overwrite", action="store_true", help="replace features made with another teacher or settings")
    f.set_defaults(func=_add_features)
    o = shards.add_parser("add-flow", help="cache dense optical flow (OpenCV, CPU) in new shards, 8-bit quantised "
                                           "(train with data.flow=true)")
    o.add_argument("--shards", required=True, help="input shards (folder, brace pattern or glob)")
    o.add_argument("--out", required=True, help="folder for the new shards (same names), sizes.json and "
                                                "flow_report.json; re-running resumes")
    o.add_argument("--algorithm", choices=["dis", "farneback"], default="dis",
                   help="OpenCV's DIS (medium preset) or Farneback")
    o.add_argument("--fps", type=float, default=8.0, help="flow fields per second over the whole video (times 0, "
                                                         "1/F, ...; field i: the frame at i/F -> the next source "
                                                         "frame); training pairs each "
                                                         "sampled frame with the nearest")
    o.add_argument("--size", type=int, default=128, help="frames resized to this short side (aspect kept, no crop)")
    o.add_argument("--clip", type=float, default=20.0, help="flow clipped to +-CLIP px before 8-bit quantisation")
    o.add_argument("--overwrite", action="store_true", help="replace flow made with other settings or an older format")
    o.set_defaults(func=_add_flow)
