"""`mmvssl models`: list the presets, or import a released model (`models import`, docs/models.md);
`mmvssl methods`: list the methods and their configs."""


def _list(args) -> None:
    from ..models.presets import list_presets, load_preset
    for name in list_presets():
        print(f"{name:<24}{load_preset(name).get('description', '')}")


def _import(args) -> None:
    from ..models.imported import import_source
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


def _methods(args) -> None:
    from ..config import load_config
    from ..methods import MODULES, get_method, method_configs
    from ..resources import data_path
    configs = method_configs()
    for path in sorted(data_path("configs", "lavila").glob("*.yaml")):  # LaViLa's narrator and dual encoder
        configs.setdefault(load_config(path).method.name, []).append(f"configs/lavila/{path.name}")
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
    imp.add_argument("source", help="a transformers save_pretrained folder or hub name, or open_clip:ARCH[:PRETRAINED]")
    imp.add_argument("--out", required=True, help="the model folder to write")
    imp.add_argument("--check", action="store_true", help="compare with the source's own forward; check.json, "
                     "fails above 1e-4")
    imp.add_argument("--frames", type=int, help="frames per clip (image models: frames pooled over time; default 8)")
    imp.add_argument("--fps", type=float, help="frame rate the clip is sampled at (default: the source's, docs/models.md)")
    imp.set_defaults(func=_import)
    sub.add_parser("methods", help="list the training methods, the paper each follows and its configs"
                   ).set_defaults(func=_methods)
