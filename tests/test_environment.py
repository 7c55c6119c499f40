"""The installed environment: the compiled extensions load together, and .venv is requirements.lock.

These tests run first (tests/conftest.py orders them) and a failure among them stops the session:
a torchaudio built against another torch then reads as one failure naming both versions, not as
dozens of unrelated errors. `make test` re-syncs .venv with the lock before pytest runs, so they
fail under `make test` only if the lock itself holds a broken pairing; run pytest directly on a
hand-changed .venv to see them catch one.
"""

from __future__ import annotations

import io
import re
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.environment

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
# Installed but never in the lock: the project itself (installed editable after the sync) and the
# installer that created the venv.
NOT_LOCKED = {"mmvssl", "pip"}


def _broken(package: str, error: BaseException) -> str:
    try:
        installed = version(package)
    except PackageNotFoundError:
        installed = "not installed"
    return (f"{package} {installed} does not work beside torch {torch.__version__} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            f"`make install` restores the pairing in {LOCK.name}")


def _exercise_torchaudio():
    import torchaudio
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, n_mels=40)
    t = torch.arange(16000) / 16000.0
    spec = mel(torch.sin(2 * torch.pi * 1000.0 * t)[None])  # (1, 40, 101)
    assert spec.shape == (1, 40, 101)
    # A 1 kHz tone puts its energy in the mel bin that contains 1 kHz, not at the edges.
    peak = int(spec[0].mean(-1).argmax())
    assert 5 < peak < 35, peak


def _exercise_torchvision():
    from torchvision.ops import nms
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)  # compiled op
    assert keep.tolist() == [0, 2]


def _exercise_av():
    import av
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    buffer.seek(0)
    with av.open(buffer) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5
    assert abs(float(frames[-1].mean()) - 160) < 8


def _exercise_sentencepiece():
    import sentencepiece as spm
    model = io.BytesIO()
    sentences = [f"the {c} {s} moves {m}" for c in ("red", "green", "blue") for s in ("circle", "square")
                 for m in ("left", "right", "up", "down")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=28, hard_vocab_limit=False,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert sp.decode(sp.encode("the red circle moves left")) == "the red circle moves left"


def _exercise_faiss():
    import faiss
    data = np.random.default_rng(0).standard_normal((64, 8)).astype("float32")
    index = faiss.IndexFlatL2(8)
    index.add(data)
    _, ids = index.search(data[[3, 17]], 1)
    assert ids[:, 0].tolist() == [3, 17]


EXTENSIONS = {"torchaudio": _exercise_torchaudio, "torchvision": _exercise_torchvision, "av": _exercise_av,
              "sentencepiece": _exercise_sentencepiece, "faiss-cpu": _exercise_faiss}


@pytest.mark.parametrize("package", sorted(EXTENSIONS))
def test_compiled_extension_loads_and_runs(package):
    failure = None
    try:
        EXTENSIONS[package]()
    except (ImportError, OSError, RuntimeError) as error:  # an undefined symbol is an OSError or ImportError
        failure = _broken(package, error)
    if failure:  # outside the except block: the message alone, not the chained import traceback
        pytest.fail(failure, pytrace=False)


def locked_versions(text: str) -> dict[str, str]:
    """{normalised name: version} of the lock's entries whose markers hold on this interpreter."""
    from packaging.markers import Marker
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if match and (match[3] is None or Marker(match[3]).evaluate()):
            pins[_normalise(match[1])] = match[2]
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_parser_reads_markers():
    text = ("torch==2.11.0 \\\n    --hash=sha256:ab\nnumpy==1.0 ; python_full_version < '3.0' \\\n"
            "numpy==9.9 ; python_full_version >= '3.0' \\\n    # via torch\nOpen_Clip.Torch==3.1 \\\n")
    assert locked_versions(text) == {"torch": "2.11.0", "numpy": "9.9", "open-clip-torch": "3.1"}


def test_installed_packages_equal_the_lock():
    pins = locked_versions(LOCK.read_text())
    assert {"torch", "torchaudio", "torchvision"} <= set(pins)
    installed = {_normalise(d.metadata["Name"]): d.version for d in distributions()}
    wrong = {name: (installed.get(name, "missing"), pinned) for name, pinned in pins.items()
             if installed.get(name) != pinned}
    extra = sorted(set(installed) - set(pins) - NOT_LOCKED)
    assert not wrong and not extra, (
        f".venv differs from {LOCK.name}: installed vs locked {wrong}, not in the lock {extra}; "
        f"`make install` syncs it")
