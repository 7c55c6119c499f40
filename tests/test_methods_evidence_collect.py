"""eval/methods_evidence.py --collect: rows of several runs joined into one table, a later run's rows of a
method replacing an earlier one's, and runs of other data or another budget refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmvssl.errors import MmvsslError

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("methods_evidence", ROOT / "eval" / "methods_evidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method: str, label: str, linear: float, steps: int = 150) -> dict:
    return {"method": method, "name": method, "label": label, "steps": steps, "train_minutes": 1.0,
            "linear": linear, "chance": 20.0, "knn": 30.0, "linear_random": 40.0, "knn_random": 25.0}


def _run(folder: Path, rows: list[dict], train: str = "shards/train") -> str:
    folder.mkdir(parents=True)
    (folder / "methods_evidence.json").write_text(json.dumps({"train": train, "test": "shards/val", "rows": rows}))
    return str(folder)


def test_collect_joins_runs_and_a_later_run_replaces_a_methods_rows(tmp_path):
    a = _run(tmp_path / "a", [_row("simclr", "shape", 27.5), _row("carl", "shape", 41.7)])
    b = _run(tmp_path / "b", [_row("simclr", "shape", 44.2), _row("fame", "motion", 76.7)])
    script = _script()
    assert script.main(["--collect", a, b, "--out", str(tmp_path / "table")]) == 0
    joined = json.loads((tmp_path / "table" / "methods_evidence.json").read_text())
    got = {(r["method"], r["label"]): (r["linear"], r["run"]) for r in joined["rows"]}
    assert got == {("simclr", "shape"): (44.2, b), ("carl", "shape"): (41.7, a), ("fame", "motion"): (76.7, b)}
    text = (tmp_path / "table" / "methods_evidence.md").read_text()
    assert "| simclr (simclr) | shape | 150 | 44.2 | 40.0 | 30.0 | 25.0 | 20.0 | yes | " + b + " |" in text
    assert "27.5" not in text  # the replaced row is gone


def test_collect_refuses_runs_of_other_data_or_another_budget(tmp_path):
    script = _script()
    a = _run(tmp_path / "a", [_row("simclr", "shape", 27.5)])
    other = _run(tmp_path / "other", [_row("carl", "shape", 41.7)], train="elsewhere/train")
    longer = _run(tmp_path / "longer", [_row("teg", "shape", 51.7, steps=300)])
    with pytest.raises(MmvsslError, match="train is elsewhere/train"):
        script.collect([a, other])
    with pytest.raises(MmvsslError, match=r"different step budgets \[150, 300\]"):
        script.collect([a, longer])
    with pytest.raises(MmvsslError, match="methods_evidence.json: not found"):
        script.collect([str(tmp_path / "missing")])
