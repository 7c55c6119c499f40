"""The modalities mmvssl knows, and which batch entries and outputs belong to each: one table that
the loader's collate, the engine, the step, the model and the objective read (it was spelt out in
each of them).

An output of the model is named `<modality>_<space>` (`video_va`, `text_vat`), or `<modality>_<kind>`
for per-frame or pooled features (`video_frames`); `modality_of` reads the modality back."""

from __future__ import annotations

MODALITIES = ("video", "audio", "text", "flow", "tgrad")
# motion streams, shaped as video (B, [V,] C, T, H, W) and encoded by a video encoder (a preset's
# `flow:` / `tgrad:` section, transformer or CNN) of this many input channels: `flow` is cached optical
# flow from the loader (data.flow; mmvssl/data/flow.py), `tgrad` the temporal gradient of `video`,
# computed on the device by the model when the batch has none (mmvssl/data/motion.py)
MOTION_CHANNELS = {"flow": 2, "tgrad": 3}
VIDEO_LIKE = ("video", *MOTION_CHANNELS)  # inputs with a view axis, encoded by the video encoders

# batch entries of each modality, besides the input itself: the per-sample presence flag and, for
# text, the mask of real MIL-NCE candidates; for video, `video_next` (the source frame after each
# sampled frame, for the temporal gradient; SampleSpec.next_frames)
BATCH_KEYS = {"video": ("video", "has_video", "video_next"), "audio": ("audio", "has_audio"),
              "text": ("text", "text_mask", "has_text"), "flow": ("flow", "has_flow"),
              "tgrad": ("tgrad", "has_tgrad")}
# where each view of a multi-view sample lies: (B, V, 2) [start, end] seconds and (B, V, 4) its
# crop [x0, y0, x1, y1] as a share of the decoded frame, views in order (every group's, see below)
VIEW_KEYS = ("view_times", "view_crops")
# every per-sample batch entry that a micro-batch split must cut along dim 0
PER_SAMPLE_KEYS = tuple(k for m in MODALITIES for k in BATCH_KEYS[m]) + VIEW_KEYS

# Views of one size travel stacked in `video` (B, V, C, T, H, W); views of another spatial size or
# frame count (SVT's local views) travel as a named group `video/<group>` (B, V', C, T', H', W'),
# which a method embeds with a forward of its own (the model folds each group's views into the
# batch once). `view_times` / `view_crops` list `video`'s views first, then each group's in order.
GROUP_SEPARATOR = "/"


def group_key(modality: str, group: str) -> str:
    """('video', 'local') -> 'video/local', the batch entry of a named view group."""
    return f"{modality}{GROUP_SEPARATOR}{group}"


def is_group(key: str) -> bool:
    """Whether batch[key] is a named view group (`video/local`)."""
    return GROUP_SEPARATOR in key and key.split(GROUP_SEPARATOR, 1)[0] in MODALITIES


def is_per_sample(key: str) -> bool:
    """Whether batch[key] is cut along dim 0 by a micro-batch split (inputs, flags, view groups)."""
    return key in PER_SAMPLE_KEYS or is_group(key)


def modality_of(output_name: str) -> str:
    """'video_va' -> 'video'; 'teacher_frames' -> 'teacher' (not a modality of the model)."""
    return output_name.split("_", 1)[0]


def presence_key(modality: str) -> str:
    """The batch's (B,) bool flag saying which samples have `modality`."""
    return f"has_{modality}"
