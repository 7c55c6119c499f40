"""`mmvssl models`: list the presets."""


def _list(args) -> None:
    from ..models.presets import list_presets, load_preset
    for name in list_presets():
        print(f"{name:<24}{load_preset(name).get('description', '')}")


def register(sub) -> None:
    sub.add_parser("models", help="list the model presets").set_defaults(func=_list)
