"""Figures for the reports, each returned as a base64 PNG so report.html stays self-contained."""

from __future__ import annotations

import base64
import io

import torch


def _figure(width: float = 5.0, height: float = 4.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def similarity_heatmap(similarity: torch.Tensor, title: str, max_size: int = 200) -> str:
    """The first `max_size` queries x items; a good model shows a bright diagonal."""
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    im = ax.imshow(similarity[:max_size, :max_size].float().numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    ax.set_xlabel("item")
    ax.set_ylabel("query")
    return _png(plt, fig)


def recall_curves(ranks: dict[str, torch.Tensor], num_items: dict[str, int]) -> str:
    """R@K against K for every direction, with the chance line K / N."""
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    for name, r in ranks.items():
        ks = torch.arange(1, num_items[name] + 1)
        ax.plot(ks.numpy(), [(100.0 * (r <= k).float().mean()).item() for k in ks], label=name)
    n = max(num_items.values())
    ks = torch.arange(1, n + 1)
    ax.plot(ks.numpy(), (100.0 * ks / n).numpy(), "k--", linewidth=0.8, label="chance (one relevant)")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("R@K (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("recall@K")
    return _png(plt, fig)


def confusion_plot(confusion: list[list[int]], classes: list[str], title: str, max_classes: int = 60) -> str:
    c = torch.tensor(confusion, dtype=torch.float)[:max_classes, :max_classes]
    c = c / c.sum(dim=1, keepdim=True).clamp_min(1)
    plt, fig = _figure(5.5, 5.0)
    ax = fig.add_subplot(111)
    ax.imshow(c.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(c) <= 30:
        names = classes[:len(c)]
        ax.set_xticks(range(len(c)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(c)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(plt, fig)


def projection_plot(embeddings: torch.Tensor, labels: list, title: str) -> str:
    """2-D PCA (torch.pca_lowrank) of the embeddings, one colour per class."""
    x = embeddings.float()
    x = x - x.mean(dim=0)
    q = min(2, x.shape[0], x.shape[1])
    _, _, v = torch.pca_lowrank(x, q=q, center=False)
    xy = (x @ v[:, :q]).numpy()
    if q == 1:
        xy = torch.cat([torch.from_numpy(xy), torch.zeros(len(xy), 1)], dim=1).numpy()
    plt, fig = _figure()
    ax = fig.add_subplot(111)
    names = sorted({str(label) for label in labels})
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for i, name in enumerate(names):
        m = [str(label) == name for label in labels]
        ax.scatter(xy[m, 0], xy[m, 1], s=12, color=cmap(i % cmap.N), label=name if len(names) <= 20 else None)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=1.5)
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    return _png(plt, fig)


def thumbnail(frame, width: int = 120) -> str:
    """(H, W, 3) uint8 -> base64 PNG."""
    plt, fig = _figure(width / 100, width / 100 * frame.shape[0] / frame.shape[1])
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(frame)
    ax.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
