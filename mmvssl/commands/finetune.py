"""`mmvssl finetune MODEL --train SHARDS --test SHARDS --task TASK --out DIR [--set key=value ...]`: a
classifier head on MODEL's video encoder trained with the task's labels (the `supervised` method
through the training engine: accelerate, resume, several processes), then the checkpoint
chosen on --val by top-1 (or, without --val, the last one: nothing is ever selected on --test) scored
on --test with multi-clip multi-crop testing (report.{json,md,html} in DIR/eval).
MODEL is a model folder, or a preset name to train from scratch (the supervised-only baseline)."""

import os

from ..errors import MmvsslError

DEFAULT_CONFIG = "configs/finetune/base.yaml"


def finetune_config(model: str, train: str, task: str, out: str, val: str = "", config: str | None = None,
                    overrides=()):
    """The experiment config of a fine-tuning run: the config file, then what the arguments say,
    then the overrides; the clip sampling is MODEL's (config.json's `sampling`) unless overridden."""
    import json
    from pathlib import Path

    from ..config import load_config
    from ..resources import data_path
    path = config or data_path(*DEFAULT_CONFIG.split("/"))
    given = [f"data.shards={train}", f"train.output_dir={out}", f"method.options.task={task}"]
    given += [f"method.options.val_shards={val}"] if val else []
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise MmvsslError(f"{model}: not a model folder (no config.json)")
        folder_config = json.loads((Path(model) / "config.json").read_text())
        sampling = folder_config.get("sampling", {})
        given += [f"method.options.pretrained={model}"]
        given += [f"data.{k}={sampling[k]}" for k in ("num_frames", "fps", "size") if k in sampling]
        if folder_config.get("kind") == "imported" and "context_length" in folder_config.get("text", {}):
            given += [f"data.context_length={folder_config['text']['context_length']}"]  # its tokenizer's length
    else:
        from ..models.presets import list_presets
        if model not in list_presets():
            raise MmvsslError(f"MODEL {model}: neither a model folder nor a preset (presets: {', '.join(list_presets())})")
        given += [f"model.preset={model}"]
    return load_config(path, [*given, *overrides])


def shared_shards(a: str, b: str) -> bool:
    """Whether two shard specs share a file (so a val set that is, or holds part of, the test set is
    caught however it is spelt: another brace range, a trailing slash, a relative path)."""
    from ..data.shardio import list_shards
    try:
        return bool({os.path.realpath(u) for u in list_shards(a)} & {os.path.realpath(u) for u in list_shards(b)})
    except MmvsslError:
        return os.path.realpath(a) == os.path.realpath(b)


def _finetune(args) -> None:
    from ..evaluation.classifier import evaluate_classifier
    from ..evaluation.features import ExtractOptions
    from ..models.classifier import load_classifier
    if args.eval_only:
        chosen = args.model
    elif not (args.train and args.task):
        raise MmvsslError("mmvssl finetune needs --train SHARDS and --task TASK (or --eval-only with a fine-tuned folder)")
    else:
        from ..train.engine import pretrain
        if args.val and shared_shards(args.val, args.test):
            raise MmvsslError(f"--val {args.val} shares shards with --test {args.test}: choosing the checkpoint on the test set flatters "
                              f"the result; give a separate validation split, or leave --val out to test the last step")
        cfg = finetune_config(args.model, args.train, args.task, args.out, args.val or "", args.config,
                              args.overrides)
        final = pretrain(cfg)
        if final.name.startswith("step_"):
            print("stopped early; continue with the same command and train.resume=latest")
            return
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return  # several processes trained; the main one tests (one report, not a race on it)
        best = os.path.join(args.out, "best")
        chosen = best if args.val and os.path.isdir(best) else str(final)
        if not args.val:
            print(f"no --val: testing the last checkpoint ({final}); give --val SHARDS to keep the best by val top-1")
    options = ExtractOptions(num_clips=args.clips, num_crops=args.crops, batch_size=args.batch_size)
    report = evaluate_classifier(load_classifier(chosen), args.test, os.path.join(args.out, "eval"), options,
                                 model_path=chosen, extra={"selected_on": None if args.eval_only else (args.val or None)})
    print(f"{chosen} on {args.test} ({args.clips} clips x {args.crops} crops): top1 {report['top1']:.1f}  "
          f"top5 {report['top5']:.1f}  mean class acc {report['mean_class_acc']:.1f}  "
          f"(chance top1 {report['chance_top1']:.1f}; {report['num_samples']} samples)")
    print(f"report: {os.path.join(args.out, 'eval', 'report.json')} (+ report.md, report.html)")


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model's video encoder with a classifier head, then test it")
    p.add_argument("model", help="a model folder (config.json + model.safetensors), or a preset name to train "
                                 "from scratch; with --eval-only, a fine-tuned folder")
    p.add_argument("--train", help="training shards (labels in each sample's metadata)")
    p.add_argument("--test", required=True, help="test shards, scored with --clips x --crops views per video")
    p.add_argument("--val", help="validation shards that choose the best checkpoint by top-1 (never --test; "
                                 "without --val the last checkpoint is tested)")
    p.add_argument("--task", help="eval/tasks/X.yaml or a task name: the classes and the label key")
    p.add_argument("--out", required=True, help="run folder: checkpoints, model (last), best, eval/report.*")
    p.add_argument("--config", help=f"the fine-tuning config (default {DEFAULT_CONFIG})")
    p.add_argument("--clips", type=int, default=4, help="clips per test video (VATT: 4)")
    p.add_argument("--crops", type=int, default=3, choices=(1, 3), help="crops per clip (VATT: 3)")
    p.add_argument("--batch-size", type=int, default=8, help="test videos per forward")
    p.add_argument("--eval-only", action="store_true", help="only score MODEL, a fine-tuned folder, on --test")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.max_steps=200 data.labelled_fraction=0.1")
    p.set_defaults(func=_finetune)
