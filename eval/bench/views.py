"""Multi-view decoding benchmark (a script, not a test): SimCLR's two augmentations of one window,
decoded once and augmented twice (what the loader does for `data.sampler: same`), against
decoding the window twice (what a sampler that draws the same window twice would cost).

    .venv/bin/python eval/bench/views.py [--videos 8] [--repeats 3] [--size 112] [--out FILE.json]

Data: eval/bench/data.py's 10 s 640x360 H.264 videos. A view: 16 frames over 2 s, decoded at the
short side the augmentation crops from (decode_short_side x size), then CVRL's temporally
consistent augmentation to size x size. Both variants run the same functions the loader runs
(decode.decode_window, augment.Augmenter), alternating, in one process, with one torch thread; the
times are CPU seconds of the process (the shared machine's wall times swing with its load), the
best of the repeats, and the ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.bench.data import make_web_video  # noqa: E402
from mmvssl.data.augment import Augmenter, AugmentOptions  # noqa: E402
from mmvssl.data.decode import decode_window  # noqa: E402
from mmvssl.data.sampling import random_window  # noqa: E402


def two_views(data: bytes, augmenter: Augmenter, size: int, decode_twice: bool, rng: random.Random) -> None:
    start = random_window(10.0, 2.0, rng)
    short_side = round(size * augmenter.options.decode_short_side)
    clip = decode_window(data, start, 16, 8.0, None, None, short_side=short_side)
    for view in range(2):
        if view and decode_twice:
            clip = decode_window(data, start, 16, 8.0, None, None, short_side=short_side)
        augmenter.video(torch.from_numpy(clip.frames), rng)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    augmenter = Augmenter(AugmentOptions(video=True), args.size)
    with tempfile.TemporaryDirectory() as tmp:
        videos = []
        for i in range(args.videos):
            path = Path(tmp) / f"{i}.mp4"
            make_web_video(path, seed=i)
            videos.append(path.read_bytes())
        seconds = {"decode once": [], "decode twice": []}
        for repeat in range(args.repeats):
            for name in (("decode once", "decode twice") if repeat % 2 == 0 else ("decode twice", "decode once")):
                rng = random.Random(repeat)
                tic = time.process_time()
                for data in videos:
                    two_views(data, augmenter, args.size, name == "decode twice", rng)
                seconds[name].append(time.process_time() - tic)
    rate = {name: len(videos) / min(s) for name, s in seconds.items()}  # best of the repeats: clips per CPU s
    result = {"clips_per_s": rate, "speedup": rate["decode once"] / rate["decode twice"],
              "videos": args.videos, "repeats": args.repeats, "size": args.size}
    print(f"two views per clip at {args.size}px: decode once {rate['decode once']:.2f} clips per CPU s, "
          f"decode twice {rate['decode twice']:.2f}, ratio {result['speedup']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
