"""Parity with the official code of published methods: every case file under the parity folder
(`MMVSSL_PARITY_DIR`, default the repo's copy in tests/data/parity, see its README.md for how the
cases were made) is fed to mmvssl's own functions, and their outputs must equal the stored ones.

Each method has a checker module `tests/parity/<method>.py` that names the case keys it reads
(`INPUTS`), the keys it reproduces (`OUTPUTS`), keys kept for debugging only (`DIAGNOSTICS`, which
it may still reproduce) and per-key tolerances (`TOLERANCES`), and a `compute(tensors, meta)` that
runs mmvssl's code on the stored inputs and returns every output key. A case of a method without a
checker, or a key no checker names, fails: nothing is skipped.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

PARITY_DIR = Path(os.environ.get("MMVSSL_PARITY_DIR") or Path(__file__).parent / "data" / "parity")
CASES = sorted(PARITY_DIR.glob("*/case_*.safetensors"))
RTOL, ATOL = 1e-5, 1e-6  # float32 against the official float32 run (the README's suggestion)


def test_the_parity_folder_holds_cases_with_their_hashes():
    assert CASES, f"no parity cases (*/case_*.safetensors) under {PARITY_DIR}"
    sums = PARITY_DIR / "SHA256SUMS"
    if sums.exists():  # the folder's own list: a case changed by hand is refused
        listed = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
        for path in CASES:
            rel = path.relative_to(PARITY_DIR).as_posix()
            assert rel in listed, f"{rel} is not listed in {sums}"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[rel], f"{rel}: hash differs from {sums}"


def assert_matches(key: str, got: torch.Tensor, want: torch.Tensor, tolerance: dict | None) -> None:
    got = torch.as_tensor(got).detach().cpu()
    assert tuple(got.shape) == tuple(want.shape), f"{key}: shape {tuple(got.shape)}, official {tuple(want.shape)}"
    if not want.is_floating_point():  # masks, labels, permutations, uint8 maps: exact
        assert torch.equal(got.to(want.dtype), want), f"{key}: {(got.to(want.dtype) != want).sum()} entries differ"
        return
    tol = {"rtol": RTOL, "atol": ATOL, **(tolerance or {})}
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), msg=lambda m: f"{key}: {m}", **tol)


@pytest.mark.parametrize("path", CASES, ids=[p.relative_to(PARITY_DIR).with_suffix("").as_posix() for p in CASES])
def test_case_matches_the_official_numbers(path: Path):
    method = path.parent.name
    try:
        checker = importlib.import_module(f"tests.parity.{method}")
    except ModuleNotFoundError:
        pytest.fail(f"{path}: no parity checker for method '{method}' (tests/parity/{method}.py)")
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    known = set(checker.INPUTS) | set(checker.OUTPUTS) | set(getattr(checker, "DIAGNOSTICS", ()))
    unknown = sorted(set(tensors) - known)
    assert not unknown, f"{path}: keys the '{method}' checker does not know: {unknown}"
    missing = sorted((set(checker.INPUTS) | set(checker.OUTPUTS)) - set(tensors))
    assert not missing, f"{path}: keys the '{method}' checker needs are not in the case: {missing}"
    torch.manual_seed(0)
    got = checker.compute({k: v.clone() for k, v in tensors.items()}, meta)
    for key in checker.OUTPUTS:
        assert key in got, f"{path}: the '{method}' checker computed no '{key}'"
    for key, value in got.items():
        if key in tensors:
            assert_matches(key, value, tensors[key], getattr(checker, "TOLERANCES", {}).get(key))
