"""`mmvssl models`: list the presets; `mmvssl methods`: list the methods and their configs."""


def _list(args) -> None:
    from ..models.presets import list_presets, load_preset
    for name in list_presets():
        print(f"{name:<24}{load_preset(name).get('description', '')}")


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
    sub.add_parser("models", help="list the model presets").set_defaults(func=_list)
    sub.add_parser("methods", help="list the training methods, the paper each follows and its configs"
                   ).set_defaults(func=_methods)
