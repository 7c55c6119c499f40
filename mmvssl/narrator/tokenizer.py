"""Narrator tokenizers: a sentencepiece model fitted on a shard set's captions and narrations
(`mmvssl tokenizer train`), or a Hugging Face GPT-2 tokenizer from a local folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..errors import MmvsslError

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class SentencePieceTokenizer:
    """ids: pad 0, unk 1, bos 2, eos 3, then the learned pieces."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm
        if not Path(model_file).is_file():
            raise MmvsslError(f"tokenizer model not found: {model_file}")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, texts: list[str], max_length: int) -> torch.Tensor:
        """(N, max_length): bos, pieces..., eos, pad...; truncated to fit (eos kept)."""
        out = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(self.sp.encode([t.lower().strip() for t in texts])):
            ids = [self.bos_id] + ids[: max_length - 2] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.sp.decode(ids)


def train_sentencepiece(texts: list[str], out_file: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Fit a unigram sentencepiece model on `texts`; writes `out_file` (a .model file)."""
    import sentencepiece as spm
    texts = [t.lower().strip() for t in texts if t and t.strip()]
    if not texts:
        raise MmvsslError("no captions or narrations to train a tokenizer on")
    buffer = io.BytesIO()
    # hard_vocab_limit=False: a small corpus may support fewer pieces than asked for
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
                                   hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
                                   minloglevel=2)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(buffer.getvalue())
    return out_file


def texts_from_shards(shards: str) -> list[str]:
    """Every caption and narration text in a shard set, reading only the `.json` / `.txt` members
    (videos are passed over unread). A sample with a member over the size limit is left out, as the
    loader leaves it out (the member is refused from its tar header, on one line: shardio.read_members)."""
    import tarfile
    from ..data.decode import DecodeError
    from ..data.rawsample import metadata
    from ..data.shardio import list_shards, read_members
    texts = []
    for url in list_shards(shards):
        samples: dict[str, dict] = {}  # key -> {"__key__", "json", "txt"}, in shard order
        refused = set()
        try:
            for name, data in read_members(url, lambda n: n.rpartition(".")[2] in ("json", "txt")):
                key, _, ext = name.rpartition("/")[2].partition(".")
                key = name.rpartition("/")[0] + "/" + key if "/" in name else key  # webdataset's key
                if data is None:
                    refused.add(key)
                elif ext in ("json", "txt"):
                    samples.setdefault(key, {"__key__": key})[ext] = data
        except (tarfile.TarError, OSError) as e:
            raise MmvsslError(f"{url}: unreadable shard ({e})") from None
        for key, sample in samples.items():
            if key in refused:
                continue
            try:
                meta = metadata(sample, with_caption=True)
            except DecodeError as e:
                raise MmvsslError(f"{url}: {e}") from None
            caption = meta.get("caption") or ""
            texts += [caption] + [n.get("text", "") for n in meta.get("narrations") or [] if isinstance(n, dict)]
    return [t for t in texts if t]
