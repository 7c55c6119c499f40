"""The `teacher:` section of an experiment config (schema only): a frozen open_clip image model
whose per-frame embeddings the video encoder is distilled towards (see mmvssl/teacher/model.py).
Off by default (`arch` empty). With `cached`, the teacher is not run: its features come from
the shards (see mmvssl/teacher/features.py, mmvssl/teacher/cache.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TeacherConfig:
    arch: str = ""  # open_clip model name (ViT-B-32), 'hf-hub:org/repo', or a model-config JSON file; "": no teacher
    pretrained: str = ""  # an open_clip tag (openai, laion2b_s34b_b79k) or a local checkpoint file; "": random weights
    image_size: int = 0  # frames are resized to this before the teacher; 0: the teacher's own image size
    patch_tokens: bool = False  # also put the teacher's patch tokens in the batch (teacher_patches)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # read the features `mmvssl shards add-features` cached in data.shards (nearest cached frame time
    # for each sampled frame) instead of running the teacher; they must come from this arch/pretrained/size
    cached: bool = False
