"""EPIC-KITCHENS-100 multi-instance retrieval (Damen et al. 2022): retrieval_annotations/
EPIC_100_retrieval_test.csv (narration_id, participant_id, video_id, narration_timestamp,
start_timestamp, stop_timestamp, start_frame, stop_frame, narration, verb, verb_class, noun,
noun_class, all_nouns, all_noun_classes), EPIC_100_retrieval_test_sentence.csv (narration_id,
narration: the columns of the relevancy matrix) and relevancy/caption_relevancy_EPIC_100_
retrieval_test.pkl (a pickled numpy array, clips x sentences, in the row order of the two CSVs).

One entry per clip (id = narration_id, caption = narration, `clip` [start, stop] seconds into
`<participant_id>/videos/<video_id>.MP4`, the official layout, kept as `source_video`). The clips
are cut from the long videos by `mmvssl datasets cut` (media.py) into `clips/<narration_id>.mp4`,
the `video` of each entry, before `shards build` (datasets/ek100_mir/README.md). The relevancy matrix is converted
ONCE into relevancy.npz (`keys` = the clips' narration_ids, `texts` = the sentences,
`relevancy`), which `mmvssl eval retrieval --relevancy` reads with allow_pickle=False.

The official matrix is a pickle, and unpickling runs code named by the file. The conversion
reads it only when asked (`--allow-pickle`), says so loudly, and even then through an unpickler
that accepts nothing but numpy's array reconstruction (no other class or function can be named
by the file); anything else is refused. Nothing at evaluation time reads a pickle."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

from ...errors import MmvsslError
from .common import Conversion, read_csv_rows, seconds

ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "scalar")}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only a plain numpy array is accepted")


def read_relevancy_pickle(path: Path) -> np.ndarray:
    """The official relevancy pickle as a float32 array, loaded with the array-only unpickler."""
    print(f"WARNING: unpickling {path} (the official EK-100 relevancy matrix) once, with an unpickler that "
          f"accepts only numpy arrays; the result is written to relevancy.npz, read without pickle from now on",
          file=sys.stderr)
    with open(path, "rb") as f:
        try:
            value = _ArrayOnlyUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise MmvsslError(f"{path}: not a pickled numpy array ({e})") from None
    array = np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise MmvsslError(f"{path}: expected a 2-D numeric relevancy matrix, got {array.dtype} {array.shape}")
    return array.astype(np.float32)


def convert(files: list[Path], conv: Conversion, relevancy: Path | None = None, allow_pickle: bool = False) -> None:
    clips_csv = [p for p in files if not Path(p).stem.endswith("_sentence")]
    sentence_csv = [p for p in files if Path(p).stem.endswith("_sentence")]
    rows = []  # the relevancy's row order: every clip row of the CSV, kept or not
    for path in clips_csv:
        for line, row in read_csv_rows(path, conv, ("narration_id", "participant_id", "video_id",
                                                      "start_timestamp", "stop_timestamp", "narration")):
            rows.append(row["narration_id"])
            try:
                start, stop = seconds(row["start_timestamp"]), seconds(row["stop_timestamp"])
            except ValueError:
                conv.problem(path, f"timestamps {row['start_timestamp']!r} / {row['stop_timestamp']!r} unreadable", line)
                continue
            if stop <= start:
                conv.problem(path, f"stop {row['stop_timestamp']} is not after start {row['start_timestamp']}", line)
                continue
            entry = {"id": row["narration_id"], "video": f"{row['participant_id']}/videos/{row['video_id']}.MP4",
                     "caption": row["narration"], "clip": [round(start, 3), round(stop, 3)], "split": "test",
                     "video_id": row["video_id"]}
            for key in ("verb", "noun", "verb_class", "noun_class"):
                if row.get(key):
                    entry[key] = row[key]
            conv.add(entry, path, line)
    if relevancy is None:
        conv.notes.append("no relevancy pickle given: relevancy.npz not written")
        return
    if not allow_pickle:
        raise MmvsslError(f"{relevancy} is a pickle; converting it once needs --allow-pickle (it is read with an "
                          f"unpickler that accepts only numpy arrays)")
    if not sentence_csv:
        raise MmvsslError("the relevancy's columns are the sentences of EPIC_100_retrieval_test_sentence.csv; "
                          "give that file too")
    texts = []
    for path in sentence_csv:
        for _, row in read_csv_rows(path, conv, ("narration_id", "narration")):
            texts.append(row["narration"])
    matrix = read_relevancy_pickle(Path(relevancy))
    if matrix.shape != (len(rows), len(texts)):
        raise MmvsslError(f"{relevancy}: relevancy is {matrix.shape}, but the CSVs have {len(rows)} clips x "
                          f"{len(texts)} sentences")
    if matrix.min() < 0 or matrix.max() > 1:
        raise MmvsslError(f"{relevancy}: relevancy outside [0, 1] ({matrix.min()} .. {matrix.max()})")
    conv.arrays["relevancy.npz"] = {"keys": np.array(rows), "texts": np.array(texts), "relevancy": matrix}
    conv.notes.append(f"relevancy.npz: {matrix.shape[0]} clips x {matrix.shape[1]} sentences")
