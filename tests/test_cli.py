import json
import subprocess
import sys

import pytest
import torch

from mmvssl.cli import main
from mmvssl.errors import MmvsslError, one_line
from mmvssl.resources import data_path


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def test_bad_command_line_is_one_line(capsys):
    code, _, err = run_cli(capsys, "pretrain")
    assert code == 2
    assert "the following arguments are required: config" in _one_line(err)
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in _one_line(err)


def test_missing_config_file(capsys):
    code, _, err = run_cli(capsys, "pretrain", "nope.yaml")
    assert code == 2 and "config file not found: nope.yaml" in _one_line(err)


def test_unknown_config_key_is_named(capsys):
    code, _, err = run_cli(capsys, "pretrain", str(data_path("configs", "demo", "tiny.yaml")), "train.max_stpes=3")
    assert code == 2 and "max_stpes" in _one_line(err)


def test_missing_model_and_missing_videos(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "retrieval", str(tmp_path / "nomodel"), "--data", str(tmp_path),
                           "--out", str(tmp_path / "e"))
    assert code == 2 and "config.json is missing" in _one_line(err)
    code, _, err = run_cli(capsys, "shards", "build", str(tmp_path / "novideos"), "--out", str(tmp_path / "s"))
    assert code == 2 and "videos folder not found" in _one_line(err)


class _FailingStream(torch.utils.data.IterableDataset):
    def __init__(self, error: Exception):
        self.error = error

    def __iter__(self):
        raise self.error


@pytest.mark.parametrize("error", [MmvsslError("shard-000003.tar: sample 7 has no video member"),
                                   FileNotFoundError("no such file: a.tar")])
def test_an_error_from_a_loader_worker_prints_as_its_own_one_line_message(error):
    loader = torch.utils.data.DataLoader(_FailingStream(error), num_workers=1)
    with pytest.raises(type(error)) as raised:
        next(iter(loader))
    assert "Original Traceback" in str(raised.value)  # what torch re-raises: the worker's traceback
    assert one_line(raised.value) == str(error)


def test_training_stopped_by_failing_samples_in_a_worker_is_one_line(capsys, tmp_path):
    import io
    import tarfile
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:  # every sample's metadata is broken
        for i in range(12):
            for name, data in ((f"{i:03d}.mp4", b"not a video"), (f"{i:03d}.json", b"{not json")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    code, _, err = run_cli(capsys, "pretrain", str(data_path("configs", "demo", "tiny.yaml")),
                           f"data.shards={tmp_path}", "data.num_workers=1", "data.batch_size=2",
                           "train.max_steps=2", "train.log_with=none", f"train.output_dir={tmp_path / 'run'}")
    line = _one_line("\n".join(x for x in err.splitlines() if not x.startswith("pretrain:")))  # the progress bar
    assert code == 2 and "samples failed to decode" in line and "shard-000000.tar" in line


def test_models_lists_presets(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "vatt-tiny" in out


def test_console_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmvssl.cli", "pretrain", str(data_path("configs", "demo", "tiny.yaml")),
                           "model.preset=vatt-huge", f"data.shards={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown model preset 'vatt-huge'" in _one_line(proc.stderr)


def test_eval_retrieval_writes_the_report(capsys, trained_run, demo_shards, tmp_path):
    code, out, _ = run_cli(capsys, "eval", "retrieval", str(trained_run / "model"), "--data", str(demo_shards["val"]),
                           "--out", str(tmp_path / "eval"))
    assert code == 0 and "t2v" in out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert {"t2v", "v2t", "a2v", "v2a"} <= set(report["retrieval"])
    for metrics in report["retrieval"].values():
        assert {"R@1", "R@5", "R@10", "MedR"} <= set(metrics)
        assert metrics["num_queries"] == 12
    assert report["chance_R@1"] == pytest.approx(100 / 12)


def test_synth_and_build_through_the_cli(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "data", "synth", "--out", str(tmp_path / "d"), "--num-train", "2", "--num-val", "2")
    assert code == 0
    code, out, _ = run_cli(capsys, "shards", "build", str(tmp_path / "d" / "val"), "--captions",
                           str(tmp_path / "d" / "val" / "captions.jsonl"), "--out", str(tmp_path / "s"))
    assert code == 0 and "accepted 2, rejected 0" in out
