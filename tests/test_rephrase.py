"""The T5 rephraser: a tiny random T5 and an offline sentencepiece tokenizer saved to a local
folder, run over the demo shards (its paraphrases are garbage; their structure is checked)."""

import json

import pytest
import torch

from mmvssl.cli import main
from mmvssl.errors import MmvsslError
from mmvssl.narrator.rephrase import RephraseConfig, load_paraphraser, paraphrase, rephrase_shards
from mmvssl.narrator.tokenizer import texts_from_shards, train_sentencepiece
from tests.conftest import raw_samples


@pytest.fixture(scope="module")
def t5_dir(demo_shards, tmp_path_factory):
    """A tiny T5 and its tokenizer (T5 id order: pad 0, eos 1, unk 2) in one save_pretrained folder."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer
    folder = tmp_path_factory.mktemp("t5")
    sp_file = train_sentencepiece(texts_from_shards(str(demo_shards["val"])) + ["paraphrase:"] * 5,
                                  folder / "sp.model", 120)
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (sp.id_to_piece(i), sp.get_score(i)) for i in range(4, sp.get_piece_size())]  # our 0-3 are specials
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sp_file.unlink()
    return folder


def test_the_local_tokenizer_knows_the_narration_words(t5_dir):
    _, tokenizer = load_paraphraser(t5_dir)
    ids = tokenizer(["paraphrase: a red circle"]).input_ids[0]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_paraphrase_gives_k_strings_per_text_in_batches(t5_dir, strategy):
    model, tokenizer = load_paraphraser(t5_dir)
    cfg = RephraseConfig(k=3, strategy=strategy, num_beams=2, max_length=6, batch_size=2)
    out = paraphrase(model, tokenizer, ["a red circle moves", "the blue square", "a ring"], cfg)
    assert len(out) == 3 and all(len(p) == 3 and all(isinstance(t, str) for t in p) for p in out)


def test_rephrase_writes_paraphrases_and_copies_every_other_member(t5_dir, val_shards_with_extra_members, tmp_path):
    cfg = RephraseConfig(k=2, max_length=6, batch_size=8)
    counts = rephrase_shards(str(t5_dir), str(val_shards_with_extra_members), str(tmp_path / "out"), cfg,
                             samples_per_shard=5, progress=False)
    before, after = raw_samples(val_shards_with_extra_members), raw_samples(tmp_path / "out")
    assert counts["samples"] == len(before) == len(after) == 12
    assert len(list((tmp_path / "out").glob("*.tar"))) == 3  # 5 samples per shard
    assert counts["paraphrases"] + counts["empty"] == 2 * counts["narrations"] > 0
    total = 0
    for old, new in zip(before, after):
        assert old["__key__"] == new["__key__"]
        members = {k for k in old if not k.startswith("__")}
        assert members == {k for k in new if not k.startswith("__")}
        assert "notes.txt.gz" in members and "extra.bin" in members
        assert all(old[k] == new[k] for k in members - {"json"})  # video, caption, .gz bytes unchanged
        old_meta, new_meta = json.loads(old["json"]), json.loads(new["json"])
        assert {k: v for k, v in new_meta.items() if k != "paraphrases"} == old_meta
        for p in new_meta["paraphrases"]:
            narration = old_meta["narrations"][p["of"]]
            assert (p["start"], p["end"]) == (narration["start"], narration["end"]) and p["text"]
        total += len(new_meta["paraphrases"])
    assert total == counts["paraphrases"]


def test_rephrase_command_and_its_errors(t5_dir, demo_shards, tmp_path, capsys):
    assert main(["rephrase", str(t5_dir), "--shards", str(demo_shards["val"]), "--out", str(tmp_path / "o"),
                 "--k", "1", "--max-length", "4", "--strategy", "beam", "--num-beams", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["samples"] == 12 and report["generated"] <= report["narrations"]  # texts seen before are reused
    with pytest.raises(MmvsslError, match="no config.json"):
        load_paraphraser(tmp_path)
    with pytest.raises(MmvsslError, match="input shard folder"):
        rephrase_shards(str(t5_dir), str(demo_shards["val"]), str(demo_shards["val"]), progress=False)


def test_a_resumed_rephrase_writes_what_an_uninterrupted_one_would(t5_dir, demo_shards, tmp_path):
    from mmvssl.data.rawsample import read_shard
    cfg = RephraseConfig(k=2, max_length=6, batch_size=4, seed=3)
    whole = rephrase_shards(str(t5_dir), str(demo_shards["val"]), str(tmp_path / "a"), cfg, samples_per_shard=5,
                            progress=False)
    rephrase_shards(str(t5_dir), str(demo_shards["val"]), str(tmp_path / "b"), cfg, samples_per_shard=5,
                    progress=False)
    (tmp_path / "b" / "shard-000001.tar").unlink()  # as if interrupted before it was renamed
    again = rephrase_shards(str(t5_dir), str(demo_shards["val"]), str(tmp_path / "b"), cfg, samples_per_shard=5,
                            progress=False)
    assert again["done_before"] == ["shard-000000.tar", "shard-000002.tar"]
    assert again["samples"] == whole["samples"] == 12
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        a, b = list(read_shard(str(tmp_path / "a" / name))), list(read_shard(str(tmp_path / "b" / name)))
        assert [s["json"] for s in a] == [s["json"] for s in b]  # the same paraphrases, sampled
    with pytest.raises(MmvsslError, match="was written with.*--overwrite"):
        rephrase_shards(str(t5_dir), str(demo_shards["val"]), str(tmp_path / "b"), RephraseConfig(k=1),
                        samples_per_shard=5, progress=False)
