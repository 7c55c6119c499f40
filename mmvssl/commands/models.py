"""`mmvssl models`: list the presets, or import a released model (`models import`, docs/models.md);
`mmvssl methods`: list the methods and their configs."""


def _list(args) -> None:
    from ..models.presets import list_presets, load_preset
    for name in list_presets():
        print(f"{name:<24}{load_preset(name).get('description', '')}")


def _is_model_folder(path: str) -> bool:
    """An mmvssl model folder (trained, imported or combined) rather than a source to import."""
    from pathlib import Path

    from ..models.imported.build import read_folder_config
    config = read_folder_config(path) if Path(path).is_dir() else None
    return isinstance(config, dict) and "model_type" not in config and (
        config.get("kind") in ("imported", "combined") or (Path(path) / "model.safetensors").is_file())


def _pools_frames(source: str) -> bool:
    """Whether a source is an image model whose frames are pooled (it reads a clip of any length and rate)."""
    from ..models.imported.sources import FRAME_MODELS, parse_source
    if parse_source(source)["kind"] == "open_clip":
        return True
    from ..models.imported.build import _hf_auto
    return _hf_auto(source, "model").model_type in FRAME_MODELS


def _import(args) -> None:
    from ..models.imported import import_source
    joined = {m: getattr(args, m) for m in ("video", "audio", "text") if getattr(args, m)}
    if joined:
        return _join(args, joined)
    from ..models.imported.build import load_imported, read_folder_config
    model = import_source(args.source, num_frames=args.frames, fps=args.fps)
    model.save_pretrained(args.out)
    spaces = ", ".join(f"{m}: {'/'.join(s)}" for m, s in model.heads.spaces.items())
    print(f"imported {args.source} -> {args.out} ({model.config['source']['library']}; towers {spaces}; "
          f"{model.config['sampling']['num_frames']} frames at {model.config['sampling']['fps']:g} fps, "
          f"{model.config['sampling']['size']} px)")
    if args.check:
        from ..models.imported.check import check_import
        saved = load_imported(args.out, read_folder_config(args.out))  # the folder as every command reads it
        report = check_import(saved, args.source, args.out)
        diffs = ", ".join(f"{m} {report[m]:.1e}" for m in ("video", "audio", "text") if m in report)
        print(f"check passed: max |difference| {diffs} (tolerance {report['tolerance']:.0e}) -> "
              f"{args.out}/check.json")


def _join(args, joined: dict) -> None:
    """BASE + towers of sources, each part in its own space (mmvssl/models/imported/combined.py)."""
    from pathlib import Path

    from ..errors import MmvsslError
    from ..models.imported import import_source
    from ..models.imported.combined import PARTS_DIR, combined_check, join
    from ..models.presets import load_model
    base_is_folder = _is_model_folder(args.source)
    if base_is_folder and (args.frames or args.fps):
        raise MmvsslError(f"--frames/--fps apply to a source imported now; BASE {args.source} is a model folder "
                          f"that keeps its own sampling")
    base = load_model(args.source) if base_is_folder else import_source(args.source, args.frames, args.fps)
    model = join(base, args.source, joined, import_source, _pools_frames)
    model.save_pretrained(args.out)
    for p in model.config["parts"]:
        uses = "; ".join(f"{m} in {'/'.join(s.values())}" for m, s in p["use"].items())
        print(f"  {p['name']:<10} {p['from']}: {uses}")
    s = model.config["sampling"]
    print(f"joined -> {args.out} ({len(model.parts)} parts, each in its own space; "
          f"{s['num_frames']} frames at {s['fps']:g} fps, {s['size']} px"
          + (f", audio at {s['audio_rate']} Hz)" if "audio_rate" in s else ")"))
    if args.check:
        from ..models.imported.check import check_import
        saved = load_model(args.out)  # the folder as every command reads it
        reports = {}
        for p in model.config["parts"]:
            if p["name"] == "base" and base_is_folder:
                continue  # an existing folder: nothing to compare it with
            reports[p["name"]] = check_import(saved.parts[p["name"]], p["from"],
                                              Path(args.out) / PARTS_DIR / p["name"])
        report = combined_check(Path(args.out), reports)
        diffs = ", ".join(f"{m} {report[m]:.1e}" for m in ("video", "audio", "text") if m in report)
        print(f"check passed ({', '.join(reports) or 'no part from a source'}): max |difference| {diffs or '-'} "
              f"-> {args.out}/check.json")


def _methods(args) -> None:
    from ..config import load_config
    from ..methods import MODULES, get_method, method_configs
    from ..resources import data_path
    configs = method_configs()
    for folder in ("lavila", "finetune"):  # LaViLa's narrator and dual encoder; supervised fine-tuning
        for path in sorted(data_path("configs", folder).glob("*.yaml")):
            configs.setdefault(load_config(path).method.name, []).append(f"configs/{folder}/{path.name}")
    for name in MODULES:
        method = get_method(name)
        print(f"{name:<14}{method.paper}")
        print(f"{'':<14}module mmvssl/methods/{MODULES[name]}.py; configs: {', '.join(configs.get(name, [])) or '-'}")


def register(sub) -> None:
    models = sub.add_parser("models", help="list the model presets; `models import` brings in a released model")
    models.set_defaults(func=_list)
    action = models.add_subparsers(dest="action")
    imp = action.add_parser("import", help="a transformers model (X-CLIP, CLAP, VideoMAE, V-JEPA 2, TimeSformer, "
                            "ViViT, CLIP, SigLIP) or open_clip:ARCH[:PRETRAINED_OR_FILE] as an mmvssl model folder")
    imp.add_argument("source", help="a transformers save_pretrained folder or hub name, or open_clip:ARCH[:PRETRAINED]; "
                     "with --video/--audio/--text also an mmvssl model folder (BASE)")
    imp.add_argument("--out", required=True, help="the model folder to write")
    imp.add_argument("--check", action="store_true", help="compare with the source's own forward; check.json, "
                     "fails above 1e-4")
    imp.add_argument("--frames", type=int, help="frames per clip (image models: frames pooled over time; default 8)")
    imp.add_argument("--fps", type=float, help="frame rate the clip is sampled at (default: the source's, docs/models.md)")
    for modality in ("video", "audio", "text"):
        imp.add_argument(f"--{modality}", metavar="SRC", help=f"join SRC's {modality} tower onto SOURCE (then BASE: a "
                         f"source or an mmvssl model folder); it keeps SRC's own space (docs/models.md)")
    imp.set_defaults(func=_import)
    sub.add_parser("methods", help="list the training methods, the paper each follows and its configs"
                   ).set_defaults(func=_methods)
