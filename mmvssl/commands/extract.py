"""`mmvssl extract MODEL --data SHARDS --out FILE`: embed every sample once, for every protocol."""

from __future__ import annotations


def add_extract_options(p) -> None:
    p.add_argument("--clips", type=int, default=1, help="windows spread uniformly over each video (default 1: centre)")
    p.add_argument("--crops", type=int, default=1, choices=(1, 3), help="spatial crops per window (1 centre, 3 ends+centre)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-member-mb", type=float, default=1024.0,
                   help="refuse shard members (videos, features) larger than this, from the tar header (default 1024)")
    p.add_argument("--max-text-member-mb", type=float, default=16.0,
                   help="refuse .json / .txt / .cls members larger than this (default 16)")


def extract_options(args):
    from ..data.shardio import MemberLimits
    from ..evaluation.features import ExtractOptions
    return ExtractOptions(num_clips=args.clips, num_crops=args.crops, batch_size=args.batch_size,
                          num_workers=args.num_workers, limits=MemberLimits(args.max_member_mb, args.max_text_member_mb))


def _extract(args) -> None:
    """One process, or every process of `torchrun --nproc_per_node N -m mmvssl.cli extract ...`
    (the shards split over them, rank 0 writes the file and prints; evaluation.features.extract_to_file)."""
    from ..data.workshare import Share
    from ..evaluation.features import extract_to_file, sidecar_path
    from ..models.presets import load_model
    model = load_model(args.model)
    with Share.from_env() as share:
        features = extract_to_file(model, args.data, args.out, extract_options(args), model_path=args.model,
                                   share=share)
    if features is None:  # not the main process
        return
    path = args.out
    names = ", ".join(f"{k} {tuple(v.shape)}" for k, v in features.items() if hasattr(v, "shape") and v.ndim == 2)
    print(f"{len(features['keys'])} samples ({features['failed']} failed to decode): {names}")
    print(f"features: {path} + {sidecar_path(path)} (model fingerprint {features['info']['model']['fingerprint']})")


def register(sub) -> None:
    p = sub.add_parser("extract", help="embed every sample of a shard set (every modality and space) into a feature file")
    p.add_argument("model", help="a model folder (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="shards: a folder, brace pattern or glob")
    p.add_argument("--out", required=True, help="feature file, FILE.safetensors (+ FILE.json beside it)")
    add_extract_options(p)
    p.set_defaults(func=_extract)
