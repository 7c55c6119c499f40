"""`mmvssl eval ...`: evaluate a model (retrieval, zeroshot, linear, knn, suite); also registers
`mmvssl extract`. DATA arguments take shards or a feature file written by `mmvssl extract`."""

import os

from . import extract

DATA_HELP = "shards (folder, brace pattern, glob) or a feature file FILE.safetensors from `mmvssl extract`"


def _retrieval(args) -> None:
    from ..evaluation.protocols import evaluate_retrieval
    from ..evaluation.retrieval import format_table
    from ..models.presets import load_model
    report = evaluate_retrieval(load_model(args.model), args.data, args.out, extract.extract_options(args),
                                model_path=args.model, relevancy=args.relevancy)
    print(format_table(report))
    print(f"report: {os.path.join(args.out, 'report.json')} (+ report.md, report.html)")


def _print_classification(report: dict, out: str) -> None:
    print(f"top1 {report['top1']:.1f}  top5 {report['top5']:.1f}  mean class acc {report['mean_class_acc']:.1f}  "
          f"(chance top1 {report['chance_top1']:.1f}, top5 {report['chance_top5']:.1f}; "
          f"{report['num_samples']} samples, {report['num_classes']} classes)")
    print(f"report: {os.path.join(out, 'report.json')} (+ report.md, report.html)")


def _classes(args):
    """(classes, source, label_key, task) from --task or --classes; (None, ...) when neither."""
    from ..evaluation.tasks import load_task, read_class_file
    if getattr(args, "task", None):
        task = load_task(args.task)
        return task.classes, task.source, task.label_key, task
    if getattr(args, "classes", None):
        return read_class_file(args.classes), args.classes, args.label_key, None
    return None, "", args.label_key, None


def _zeroshot(args) -> None:
    from ..evaluation.protocols import evaluate_zeroshot
    from ..evaluation.tasks import Task
    from ..models.presets import load_model
    classes, source, label_key, task = _classes(args)
    if task is None:
        task = Task(name=os.path.basename(source), classes=classes, modality=args.modality or "video", label_key=label_key,
                    source=source)
        if args.templates:
            task.templates = args.templates
    elif args.modality:
        task.modality = args.modality
    report = evaluate_zeroshot(load_model(args.model), args.data, args.out, task, extract.extract_options(args),
                               model_path=args.model)
    _print_classification(report, args.out)


def _probe(args) -> None:
    from ..evaluation.protocols import evaluate_probe
    from ..models.presets import load_model
    classes, source, label_key, _ = _classes(args)
    report = evaluate_probe(args.action, load_model(args.model), args.train, args.test, args.out, classes, source,
                            label_key, args.feature, extract.extract_options(args), model_path=args.model,
                            **({"k": args.k, "temperature": args.temperature} if args.action == "knn" else {}))
    _print_classification(report, args.out)


def _suite(args) -> None:
    from ..evaluation.protocols import evaluate_suite
    from ..evaluation.tasks import load_task
    from ..models.presets import load_model
    task = load_task(args.task)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.model)), f"eval-{task.name}")
    summary = evaluate_suite(load_model(args.model), task, out, args.train, args.test, extract.extract_options(args),
                             model_path=args.model, feature=args.feature)
    for protocol, r in summary["results"].items():
        if "top1" in r:
            over = f"  [{r['aggregate']}]" if "aggregate" in r else ""
            print(f"{protocol:<10} top1 {r['top1']:6.1f}  top5 {r['top5']:6.1f}  (chance top1 {r['chance_top1']:.1f}){over}")
        else:
            for d, m in r["retrieval"].items():
                print(f"{protocol:<10} {d} R@1 {m['R@1']:6.1f}  R@5 {m['R@5']:6.1f}  R@10 {m['R@10']:6.1f}  "
                      f"MedR {m['MedR']:.1f}  (chance R@1 {m['chance_R@1']:.1f})")
            for name, m in r.get("mir", {}).items():
                print(f"{protocol:<10} EK-100 MIR {name}: v2t {m['v2t']:.1f}  t2v {m['t2v']:.1f}  avg {m['avg']:.1f}")
    print(f"reports: {out}/<protocol>/report.html, summary {out}/report.json")


def _common(p, data: bool = True) -> None:
    p.add_argument("model", help="a model folder (config.json + model.safetensors)")
    if data:
        p.add_argument("--data", required=True, help=DATA_HELP)
    extract.add_extract_options(p)


def register(sub) -> None:
    extract.register(sub)
    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="action", required=True)

    r = ev.add_parser("retrieval", help="zero-shot retrieval between modalities (t2v, v2t, a2v, v2a, t2a, a2t)")
    _common(r)
    r.add_argument("--out", required=True)
    r.add_argument("--relevancy", help="EK-100 MIR relevancy: .npz with keys, texts, relevancy (adds mAP, nDCG)")
    r.set_defaults(func=_retrieval)

    z = ev.add_parser("zeroshot", help="zero-shot classification from class names and prompt templates")
    _common(z)
    group = z.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", help="eval/tasks/X.yaml or a task name (classes + templates)")
    group.add_argument("--classes", help="class names, one per line (or a task YAML)")
    z.add_argument("--templates", nargs="+", help="prompt templates with {} (with --classes)")
    z.add_argument("--modality", choices=("video", "audio"),
                   help="classify video (default) or audio (in the vat space); overrides the task's")
    z.add_argument("--label-key", default="label", help="metadata key of the label (with --classes)")
    z.add_argument("--out", required=True)
    z.set_defaults(func=_zeroshot)

    for kind, text in (("linear", "linear probe (logistic regression) on frozen features"),
                       ("knn", "weighted kNN (cosine, k=20) on frozen features")):
        p = ev.add_parser(kind, help=text)
        _common(p, data=False)
        p.add_argument("--train", required=True, help=DATA_HELP)
        p.add_argument("--test", required=True, help=DATA_HELP)
        p.add_argument("--out", required=True)
        group = p.add_mutually_exclusive_group()
        group.add_argument("--task", help="take the class list from a task")
        group.add_argument("--classes", help="class names, one per line (default: the training labels)")
        p.add_argument("--label-key", default="label")
        p.add_argument("--feature", default="video_pooled",
                       help="which features: video_pooled (encoder output), video_va, video_vat, audio_pooled, ...")
        if kind == "knn":
            p.add_argument("--k", type=int, default=20)
            p.add_argument("--temperature", type=float, default=0.07)
        p.set_defaults(func=_probe)

    s = ev.add_parser("suite", help="run every protocol a task defines")
    _common(s, data=False)
    s.add_argument("--task", required=True)
    s.add_argument("--train", help="training shards (default: the task's data.train)")
    s.add_argument("--test", help="test shards (default: the task's data.test)")
    s.add_argument("--out", help="report folder (default: eval-<task> beside the model)")
    s.add_argument("--feature", help="features for linear/kNN (default: <modality>_pooled)")
    s.set_defaults(func=_suite)
