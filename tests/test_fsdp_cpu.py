"""FSDP through accelerate on CPU (issue 26): accelerate 1.15 cannot run it (it resolves a CPU
launch to MULTI_CPU and wraps the model in DDP, ignoring the FSDP plugin), so mmvssl refuses the
launch of configs/accelerate/fsdp_cpu.yaml with one line instead of training DDP under a FSDP
name; for FSDP1 and FSDP2. DeepSpeed is not installed here: documented as GPU-only."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import accelerate
import pytest

from tests.test_distributed_cli import BIN, ROOT, _free_port, run_config  # noqa: F401 (a fixture)


@pytest.mark.skipif(sys.platform != "linux", reason="2-process gloo launches on linux")
@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_launch_on_cpu_is_refused_in_one_line(run_config, tmp_path, version):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file",
                             str(ROOT / "configs/accelerate/fsdp_cpu.yaml"), "--fsdp_version", version,
                             "--main_process_port", str(_free_port()), "-m", "mmvssl.cli", "pretrain",
                             str(run_config), f"train.output_dir={out}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "the launcher asked for FSDP" in line]
    assert lines, result.stderr[-3000:]
    assert (f"accelerate {accelerate.__version__} set up MULTI_CPU on cpu" in lines[0]
            and "configs/accelerate/cpu.yaml" in lines[0])
    assert not (out / "checkpoints").exists()  # refused before any step


def test_deepspeed_is_not_installed_here():
    """docs/distributed.md calls DeepSpeed GPU-only on the strength of this: it is not in the environment."""
    assert importlib.util.find_spec("deepspeed") is None
