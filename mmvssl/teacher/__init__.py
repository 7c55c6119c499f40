"""The image teacher, in one place: a frozen open_clip image model whose per-frame embeddings a
video encoder is distilled towards (iBoot; `configs/methods/iboot.yaml`, `configs/demo/distill.yaml`).

- options.py   the `teacher:` config section (arch, pretrained tag or file, image size, precision, cached)
- model.py     the open_clip adapter: loading by name, hub id, config file or local weights, the
               frames -> embeddings forward, and the teacher's fingerprint (teacher_identity)
- cache.py     the `<key>.teacher.safetensors` member that caches its features in shards, the
               fingerprint check, and the pairing of cached frames with sampled frame times
- features.py  `mmvssl shards add-features`: the teacher run over shards, written through the one
               shard rewriter (mmvssl.data.rewrite)

The distillation terms it feeds live with the other loss terms (mmvssl/losses/distill.py) and the
method that runs it is `contrastive` (mmvssl/methods/contrastive.py: online_teacher, cached_teacher).
Nothing is imported here, so that the loader can read the cache format without loading open_clip.
"""
