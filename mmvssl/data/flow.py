"""Optical flow: computed once on the CPU with OpenCV (`mmvssl shards add-flow`), cached in shards
quantised to 8 bits, and paired by the loader with the frames a clip sampler chose.

Computation: for each time 0, 1/F, 2/F, ... seconds over the whole video (F = `fps`, the times of
mmvssl/data/cachetimes.py), the frame shown at that time and the source frame decoded right after
it (decode_window's `next_frames`), both with the loader's decoder resized to `size` px on the
short side (aspect kept, no crop, so that any later crop of the frame is also a crop of the flow),
converted to grey; flow[i] = the dense flow between those two consecutive source frames (OpenCV's
DIS, medium preset, or Farneback), in pixels of those frames per source frame. This is the flow the
papers use (MSCL, MaCLR, CoCLR: TV-L1 / RAFT between consecutive frames of the video), sampled at the
cache's times, not the flow over 1/F s between two cached frames. The last source frame has no
successor: its field is 0 (as the temporal gradient's).

Storage (the two-stream convention, per sample): flow clipped to +-`clip` px, then mapped to
uint8 by q = round(flow / scale * 127) + 128 with scale = the sample's largest |flow| (at most
`clip`), so 0 is exactly 128 and the error is at most scale / 254 px. The member
`<key>.flow.safetensors` holds `flow` (N, H, W, 2) uint8 (x then y), `times` (N,) float32 and
`scale` (1,) float32, with string metadata: format, algorithm, fps, size, clip, duration. It is a
safetensors file: never a pickle. `FORMAT` names the version; a member of an older format (flow
between cached frames 1/F s apart) is refused with a line saying so and how to recompute it.

Pairing (`pair_flow`): each sampled frame time takes the nearest cached field (cachetimes), the
view's crop box (a share of the decoded frame, as the loader records it) and horizontal flip are
applied to the field, which is resized to the clip's size with its vectors scaled to match: the
result is in pixels of the clip per source frame, x to the right and y down.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MmvsslError
from .cachetimes import nearest_indices

MEMBER = "flow.safetensors"  # the member's extension: <key>.flow.safetensors
REPORT = "flow_report.json"
FORMAT = "mmvssl-flow/2"  # /2: flow between consecutive source frames at each cached time
# formats this mmvssl no longer reads, and what they held
OLD_FORMATS = {"mmvssl-flow/1": "flow between cached frames 1/F s apart, not between consecutive source frames"}
ALGORITHMS = ("dis", "farneback")


def _grey(frame: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


class FlowComputer:
    """Dense flow between consecutive RGB frames with OpenCV; `__call__` keeps the last frame of
    the previous call, so a long video goes through in chunks with the same result."""

    def __init__(self, algorithm: str = "dis"):
        import cv2
        if algorithm not in ALGORITHMS:
            raise MmvsslError(f"flow algorithm must be one of {', '.join(ALGORITHMS)}, got '{algorithm}'")
        self.algorithm = algorithm
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM) if algorithm == "dis" else None
        self.previous: np.ndarray | None = None

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(H, W) grey frames -> (H, W, 2) float32 flow from a to b."""
        import cv2
        if self.dis is not None:
            return self.dis.calc(a, b, None)
        # Farneback with OpenCV's sample parameters (pyramid 0.5 x 3 levels, window 15, 3 iterations,
        # polynomial of 5 px neighbourhoods, sigma 1.2)
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)

    def pairs(self, frames: np.ndarray, following: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 frames and the frame after each (same shape) -> (n, H, W, 2) float32:
        row i is the flow from frames[i] to following[i] (decode_window's next_frames)."""
        if frames.shape != following.shape:
            raise ValueError(f"flow pairs: frames {frames.shape} and their next frames {following.shape} differ")
        out = np.zeros((*frames.shape[:3], 2), np.float32)
        for i, (frame, after) in enumerate(zip(frames, following)):
            out[i] = self.pair(_grey(frame), _grey(after))
        return out

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> (n, H, W, 2) float32: row i is the flow from the frame before it
        (the previous call's last frame for row 0; 0 for the very first frame) to frame i."""
        out = np.zeros((*frames.shape[:3], 2), np.float32)
        for i, frame in enumerate(frames):
            grey = _grey(frame)
            if self.previous is not None:
                out[i] = self.pair(self.previous, grey)
            self.previous = grey
        return out


def video_flow(frames: np.ndarray, algorithm: str = "dis") -> np.ndarray:
    """(N, H, W, 3) uint8 frames -> (N, H, W, 2) float32, flow[i] from frame i to i + 1, flow[N-1] = 0."""
    backward = FlowComputer(algorithm)(frames)  # row i: frame i - 1 -> i
    return np.concatenate([backward[1:], np.zeros_like(backward[:1])])


def quantise(flow: np.ndarray, clip: float = 20.0) -> tuple[np.ndarray, float]:
    """(..., 2) float flow -> (uint8 of the same shape, scale): q = round(f / scale * 127) + 128."""
    if clip <= 0:
        raise ValueError(f"flow clip must be > 0, got {clip}")
    flow = np.clip(flow, -clip, clip)
    scale = float(min(clip, max(float(np.abs(flow).max(initial=0.0)), 1e-6)))
    q = np.rint(flow / scale * 127.0) + 128.0
    return q.clip(1, 255).astype(np.uint8), scale


def dequantise(q: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 -> float32 flow in pixels."""
    return (q.float() - 128.0) * (scale / 127.0)


def encode_member(q: np.ndarray, scale: float, times: torch.Tensor, algorithm: str, fps: float, size: int,
                  clip: float, duration: float) -> bytes:
    from safetensors.torch import save

    from ..fsio import stable_safetensors
    if q.dtype != np.uint8 or q.ndim != 4 or q.shape[-1] != 2 or times.shape != (q.shape[0],):
        raise ValueError(f"flow (N, H, W, 2) uint8 and times (N,) expected, got {q.shape} {q.dtype} and "
                         f"{tuple(times.shape)}")
    metadata = {"format": FORMAT, "algorithm": algorithm, "fps": repr(float(fps)), "size": str(int(size)),
                "clip": repr(float(clip)), "duration": repr(float(duration))}
    tensors = {"flow": torch.from_numpy(np.ascontiguousarray(q)), "times": times.float().contiguous(),
               "scale": torch.tensor([scale], dtype=torch.float32)}
    return stable_safetensors(save(tensors, metadata=metadata))  # the same bytes in every run


def decode_member(data: bytes) -> tuple[torch.Tensor, float, torch.Tensor, dict]:
    """Member bytes -> (flow (N, H, W, 2) uint8, scale, times (N,) float32, metadata)."""
    from safetensors.torch import load
    try:
        # safetensors gives metadata only for files on disk; its header is an 8-byte length and JSON
        (length,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + length]).get("__metadata__") or {}
        tensors = load(bytes(data))
        flow, times, scale = tensors["flow"], tensors["times"], float(tensors["scale"][0])
    except Exception as e:  # struct, JSON, SafetensorError, a missing tensor: all mean a broken member
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"not a flow member ({reason})") from None
    if meta.get("format") in OLD_FORMATS:
        raise ValueError(f"flow cached in the older format {meta['format']} ({OLD_FORMATS[meta['format']]}); "
                         f"recompute it: `mmvssl shards add-flow --shards ORIGINAL --out THIS_FOLDER --overwrite`")
    if meta.get("format") != FORMAT or flow.dtype != torch.uint8 or flow.ndim != 4 or flow.shape[-1] != 2 \
            or times.shape != (flow.shape[0],):
        raise ValueError(f"not a flow member of format {FORMAT} (flow {tuple(flow.shape)} {flow.dtype}, "
                         f"times {tuple(times.shape)}, format {meta.get('format')})")
    return flow, scale, times, meta


def centre_box(height: int, width: int) -> list[float]:
    """The centre square of a (height, width) frame as [x0, y0, x1, y1] shares: what the decoder keeps
    when it resizes to a square size without augmentation."""
    side = min(height, width)
    x0, y0 = (width - side) / 2 / width, (height - side) / 2 / height
    return [x0, y0, 1.0 - x0, 1.0 - y0]


def crop_flow(flow: torch.Tensor, box: list[float], flipped: bool, size: int) -> torch.Tensor:
    """(T, 2, H, W) float flow of whole frames -> (T, 2, size, size): the box [x0, y0, x1, y1]
    (shares of the frame) resized to the clip's size, vectors scaled to its pixels, mirrored
    (x negated) when the clip was flipped horizontally."""
    T, _, H, W = flow.shape
    x0, y0, x1, y1 = box
    sx, sy = x1 - x0, y1 - y0
    # output -> input normalised coordinates (align_corners=False): x_in = sx * x_out + (x0 + x1 - 1)
    theta = torch.tensor([[-sx if flipped else sx, 0.0, x0 + x1 - 1.0], [0.0, sy, y0 + y1 - 1.0]],
                         dtype=flow.dtype).expand(T, 2, 3)
    grid = F.affine_grid(theta, [T, 2, size, size], align_corners=False)
    out = F.grid_sample(flow, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = torch.tensor([size / (sx * W) * (-1.0 if flipped else 1.0), size / (sy * H)], dtype=flow.dtype)
    return out * gain.view(1, 2, 1, 1)  # (T, 2, size, size)


def pair_flow(raw: dict, sampled: torch.Tensor, box: list[float] | None, flipped: bool, size: int) -> torch.Tensor:
    """The cached flow of a raw tar sample for its sampled frame times (T,) as float32
    (2, T, size, size) in pixels of the clip per source frame; `box` None: the decoder's centre
    square. MmvsslError naming the shard and key when the flow is missing, broken, or does not
    cover the window."""
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
    if MEMBER not in raw:
        raise MmvsslError(f"{where} has no cached optical flow (.{MEMBER}); data.flow needs shards written by "
                          f"`mmvssl shards add-flow`")
    try:
        q, scale, times, meta = decode_member(raw[MEMBER])
        index = nearest_indices(times, sampled, float(meta.get("duration", "inf")), float(meta.get("fps", "1")),
                                what="flow field")
    except ValueError as e:
        raise MmvsslError(f"{where}: .{MEMBER}: {e}") from None
    flow = dequantise(q[index], scale).permute(0, 3, 1, 2)  # (T, 2, H, W)
    box = centre_box(*flow.shape[-2:]) if box is None else box
    return crop_flow(flow, box, flipped, size).transpose(0, 1).contiguous()  # (2, T, size, size)


def flow_to_rgb(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """(H, W, 2) flow -> (H, W, 3) uint8 in the colour-wheel coding of Baker et al. (Middlebury):
    hue = direction, saturation = magnitude / max_magnitude (the field's largest by default), white = still."""
    import cv2
    u, v = flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32)
    magnitude, angle = cv2.cartToPolar(u, v, angleInDegrees=True)
    top = max_magnitude or float(magnitude.max()) or 1.0
    hsv = np.zeros((*flow.shape[:2], 3), np.uint8)
    hsv[..., 0] = (angle / 2).astype(np.uint8)  # OpenCV's 8-bit hue is 0..179
    hsv[..., 1] = np.clip(magnitude / top * 255, 0, 255).astype(np.uint8)
    hsv[..., 2] = 255
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
