"""LaViLa's text sources (human narration, paraphrase, pseudo-narration, flagged) and its
separate temperature for generated pairs, checked against hand computations."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from omegaconf import OmegaConf

from mmvssl.data.augment import AugmentOptions
from mmvssl.data.loader import SampleSpec, build_loader
from mmvssl.data.options import DataConfig, sample_spec
from mmvssl.data.sampling import select_source_texts, select_texts
from mmvssl.errors import ConfigError
from mmvssl.losses.contrastive import mil_nce_loss, nce_loss
from mmvssl.losses.objective import Objective
from mmvssl.train.options import ObjectiveConfig

META = {"caption": "cap",
        "narrations": [{"start": 0, "end": 1, "text": "early"}, {"start": 4, "end": 6, "text": "overlap"}],
        "paraphrases": [{"start": 0, "end": 1, "text": f"early {i}", "of": 0} for i in range(3)]
        + [{"start": 4, "end": 6, "text": f"overlap {i}", "of": 1} for i in range(3)],
        "pseudo_narrations": [{"start": 0, "end": 2, "text": "p0", "score": -1.0},
                              {"start": 4, "end": 6, "text": "p4", "score": -1.0}]}


def test_each_source_gives_its_texts_nearest_the_window_and_flags_generated_ones():
    rng = random.Random(0)
    assert select_source_texts(META, 4.5, 5.5, 3) == (select_texts(META, 4.5, 5.5, 3), False)
    assert select_source_texts(META, 4.5, 5.5, 3, ("pseudo",), rng) == (["p4", "p0"], True)
    texts, generated = select_source_texts(META, 4.5, 5.5, 2, ("paraphrase",), rng)
    # one per narration; paraphrases are ground truth (LaViLa), only narrator outputs are flagged
    assert not generated and texts[0].startswith("overlap ") and texts[1].startswith("early ")
    drawn = {select_source_texts(META, 0, 1, 1, ("paraphrase",), random.Random(s))[0][0] for s in range(30)}
    assert drawn == {"early 0", "early 1", "early 2"}
    # a source the sample lacks is never drawn; without any source there is no text
    assert select_source_texts({"caption": "c"}, 0, 1, 2, ("human", "pseudo"), rng) == (["c"], False)
    assert select_source_texts({}, 0, 1, 2, ("human", "pseudo"), rng) == ([], False)
    picks = [select_source_texts(META, 0, 1, 1, ("human", "paraphrase", "pseudo"), random.Random(s))[1]
             for s in range(40)]
    assert 0 < sum(picks) < 40  # both human and generated texts are drawn


def test_text_sources_are_validated_and_reach_the_sample_spec():
    cfg = OmegaConf.structured(DataConfig)
    assert sample_spec(cfg, train=True, seed=0).text_sources == ("human",)
    cfg.text_sources = ["human", "pseudo"]
    assert sample_spec(cfg, train=True, seed=0).text_sources == ("human", "pseudo")
    assert sample_spec(cfg, train=False, seed=0).text_sources == ("human",)  # evaluation: human texts
    cfg.text_sources = ["human", "narrator"]
    with pytest.raises(ConfigError, match="data.text_sources.*narrator"):
        sample_spec(cfg, train=True, seed=0)


@pytest.fixture(scope="module")
def pseudo_shards(demo_shards, tmp_path_factory):
    """The demo train shards, each sample's metadata with one pseudo-narration over the video."""
    out = tmp_path_factory.mktemp("pseudo")
    urls = sorted(map(str, demo_shards["train"].glob("*.tar")))
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=8, verbose=0) as writer:
        for sample in wds.WebDataset(urls, shardshuffle=False):
            meta = json.loads(sample["json"])
            meta["pseudo_narrations"] = [{"start": 0.0, "end": meta["duration"], "text": f"pseudo {sample['__key__']}"}]
            writer.write({"__key__": sample["__key__"], "mp4": sample["mp4"], "json": json.dumps(meta).encode()})
    return out


def test_loader_draws_sources_per_sample_and_leaves_windows_and_augmentation_unchanged(pseudo_shards):
    spec = dict(num_frames=4, fps=2.0, size=32, audio_rate=8000, context_length=16, num_candidates=2, train=True,
                seed=3, augment=AugmentOptions(audio=True))
    batches = {}
    for sources in (("human",), ("pseudo",), ("human", "pseudo")):
        loader = build_loader(str(pseudo_shards), SampleSpec(**spec, text_sources=sources), batch_size=12)
        batches[sources] = next(iter(loader))
    human, pseudo, mixed = batches.values()
    assert not human["text_generated"].any() and pseudo["text_generated"].all()
    assert 0 < mixed["text_generated"].sum() < 12
    assert pseudo["text_mask"].sum(1).eq(1).all() and human["text_mask"].all()
    for b in (pseudo, mixed):
        assert b["key"] == human["key"] and torch.equal(b["video"], human["video"])
        assert torch.equal(b["audio"], human["audio"])  # the audio gain was drawn before the text source
    flag = mixed["text_generated"]
    assert torch.equal(mixed["text"][flag, 0], pseudo["text"][flag, 0])
    assert torch.equal(mixed["text"][~flag], human["text"][~flag])


CANDIDATES = ("alpha", "beta", "gamma")  # each pseudo-narrated window's three narrator candidates


@pytest.fixture(scope="module")
def candidate_shards(demo_shards, tmp_path_factory):
    """The demo train shards with `mmvssl narrate`'s records: one window over each video whose three
    candidates are '<key> alpha', '<key> beta', '<key> gamma' (the best, alpha, also its text)."""
    out = tmp_path_factory.mktemp("candidates")
    urls = sorted(map(str, demo_shards["train"].glob("*.tar")))
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=8, verbose=0) as writer:
        for sample in wds.WebDataset(urls, shardshuffle=False):
            meta, key = json.loads(sample["json"]), sample["__key__"]
            candidates = [{"text": f"{key} {c}", "score": -1.0 - i} for i, c in enumerate(CANDIDATES)]
            meta["pseudo_narrations"] = [{"start": 0.0, "end": meta["duration"], "text": candidates[0]["text"],
                                          "score": -1.0, "candidates": candidates}]
            meta["pseudo_narrations_provenance"] = {"narrator": "0123456789abcdef", "seed": 0}
            writer.write({"__key__": key, "mp4": sample["mp4"], "json": json.dumps(meta).encode()})
    return out


class TextIds:
    """A tokenizer that gives each distinct text one id (in position 0), to read back which text a
    sample drew."""

    def __init__(self, context_length: int):
        self.context_length, self.ids = context_length, {}

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            out[i, 0] = self.ids.setdefault(text, len(self.ids) + 1)
        return out

    def text(self, token: int) -> str:
        return {v: k for k, v in self.ids.items()}[int(token)]


def test_pseudo_candidates_are_drawn_per_window_and_malformed_ones_refused():
    meta = {"pseudo_narrations": [{"start": 0, "end": 2, "text": "a0", "candidates": [
        {"text": "a0", "score": -1}, {"text": "a1", "score": -2}, {"text": " ", "score": -3}]},
        {"start": 4, "end": 6, "text": "b0"}]}
    assert select_source_texts(meta, 0, 1, 2, ("pseudo",)) == (["a0", "b0"], True)  # no rng: the best
    drawn = {select_source_texts(meta, 0, 1, 1, ("pseudo",), random.Random(s))[0][0] for s in range(40)}
    assert drawn == {"a0", "a1"}  # an empty candidate is never drawn
    bad = {"pseudo_narrations": [{"start": 0, "end": 2, "text": "a0", "candidates": ["a0"]}]}
    with pytest.raises(ValueError, match="'pseudo_narrations'.*'candidates' is not a list of"):
        select_source_texts(bad, 0, 1, 1, ("pseudo",), random.Random(0))


def test_the_loader_draws_among_a_windows_candidates_seeded_by_sample_and_step(candidate_shards):
    """Each clip's pseudo text is one of its window's candidates, drawn with the sample's generator
    (seeded by the run's seed and the sample's place in the stream): the same stream draws the same,
    a resumed stream draws what the uninterrupted one drew at that step, a clip met at other steps
    draws other candidates; the flag marks exactly the clips whose text is pseudo."""
    spec = SampleSpec(num_frames=2, fps=2.0, size=32, audio_rate=8000, context_length=4, num_candidates=1,
                      train=True, seed=3, text_sources=("human", "pseudo"))

    def drawn(start_batch=0, batches=3):
        tok = TextIds(4)
        loader = build_loader(str(candidate_shards), spec, batch_size=6, start_batch=start_batch, tokenizer=tok)
        out = []
        for batch, _ in zip(loader, range(batches)):
            out.append([(key, tok.text(t), bool(g)) for key, t, g in
                        zip(batch["key"], batch["text"][:, 0, 0], batch["text_generated"])])
        return out
    stream = drawn()
    assert drawn() == stream and drawn(start_batch=1, batches=2) == stream[1:]
    rows = [row for batch in stream for row in batch]
    pseudo = [(key, text) for key, text, generated in rows if generated]
    assert 0 < len(pseudo) < len(rows)
    assert all(text.split(" ", 1)[0] == key and text.split(" ", 1)[1] in CANDIDATES for key, text in pseudo)
    assert all(text.split(" ", 1)[0] != key for key, text, generated in rows if not generated)  # human texts
    assert {text.split(" ", 1)[1] for _, text in pseudo} == set(CANDIDATES)  # not only the best
    longer = [row for batch in drawn(batches=12) for row in batch if row[2]]
    per_key = {}
    for key, text, _ in longer:
        per_key.setdefault(key, set()).add(text)
    assert any(len(texts) > 1 for texts in per_key.values())  # one clip, other steps, other candidates


def test_flagged_pseudo_texts_take_the_pseudo_scale_in_ssl_clip(candidate_shards):
    """The loader's text_generated is ssl_clip's pseudo flag: the objective's loss on a loader batch is
    SSLCLIPLoss with ground_truth = not text_generated (and not the all-ground-truth loss)."""
    from mmvssl.losses.contrastive import ssl_clip_loss
    spec = SampleSpec(num_frames=2, fps=2.0, size=32, audio_rate=8000, context_length=8, num_candidates=1,
                      train=True, seed=3, text_sources=("human", "pseudo"))
    batch = next(iter(build_loader(str(candidate_shards), spec, batch_size=8)))
    generated = batch["text_generated"]
    assert 0 < int(generated.sum()) < 8
    objective = Objective([{"name": "vt_clip", "loss": "ssl_clip", "inputs": ["video_vat", "text_vat"],
                            "pseudo_temperature": 0.5}], temperature=0.07)
    torch.manual_seed(5)
    emb = {"video_vat": _unit(8, 16), "text_vat": _unit(8, 1, 16)}
    _, values = objective(emb, batch)
    expected = ssl_clip_loss(emb["video_vat"], emb["text_vat"][:, 0], 0.07, pseudo_temperature=0.5,
                             ground_truth=~generated)
    truth = ssl_clip_loss(emb["video_vat"], emb["text_vat"][:, 0], 0.07, pseudo_temperature=0.5)
    assert float(values["vt_clip"]) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(values["vt_clip"]) - float(truth)) > 1e-3


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_nce_with_a_temperature_per_pair_matches_a_hand_computation():
    torch.manual_seed(0)
    a, b, tau = _unit(3, 4), _unit(3, 4), torch.tensor([0.07, 0.5, 0.07])
    expected = 0.0
    for i in range(3):
        for x, y in ((a, b), (b, a)):
            scores = [float(x[i] @ y[j]) / float(tau[i]) for j in range(3)]
            expected += 0.5 * (math.log(sum(math.exp(s) for s in scores)) - scores[i]) / 3
    assert float(nce_loss(a, b, tau)) == pytest.approx(expected, rel=1e-5)
    assert float(nce_loss(a, b, torch.full((3,), 0.07))) == pytest.approx(float(nce_loss(a, b, 0.07)), rel=1e-6)


def test_mil_nce_with_a_temperature_per_pair_matches_a_hand_computation():
    torch.manual_seed(1)
    v, t, tau = _unit(3, 4), _unit(3, 2, 4), torch.tensor([0.1, 0.1, 0.3])
    cand = torch.tensor([[True, True], [True, False], [True, True]])
    expected = 0.0
    for i in range(3):
        pos = [float(v[i] @ t[i, k]) / float(tau[i]) for k in range(2) if cand[i, k]]
        row = [float(v[i] @ t[j, k]) / float(tau[i]) for j in range(3) for k in range(2) if cand[j, k]]
        col = [float(v[j] @ t[i, k]) / float(tau[i]) for j in range(3) if j != i for k in range(2) if cand[i, k]]
        lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
        expected += (lse(row + col) - lse(pos)) / 3
    assert float(mil_nce_loss(v, t, tau, candidate_mask=cand)) == pytest.approx(expected, rel=1e-5)


def test_objective_uses_the_generated_temperature_for_generated_pairs_only():
    cfg = OmegaConf.structured(ObjectiveConfig)
    cfg.terms[1].generated_temperature = 0.5  # vt_milnce
    objective = Objective(OmegaConf.to_container(cfg.terms), temperature=0.07)
    torch.manual_seed(2)
    emb = {"video_va": _unit(4, 8), "audio_va": _unit(4, 8), "video_vat": _unit(4, 8), "text_vat": _unit(4, 2, 8)}
    generated = torch.tensor([False, True, False, True])
    mask = torch.ones(4, 2, dtype=torch.bool)
    _, values = objective(emb, {"text_mask": mask, "text_generated": generated})
    tau = torch.tensor([0.07, 0.5, 0.07, 0.5])
    assert float(values["vt_milnce"]) == pytest.approx(float(mil_nce_loss(emb["video_vat"], emb["text_vat"], tau,
                                                                            candidate_mask=mask)), rel=1e-6)
    assert float(values["va_nce"]) == pytest.approx(float(nce_loss(emb["video_va"], emb["audio_va"], 0.07)))
    _, human = objective(emb, {"text_mask": mask, "text_generated": torch.zeros(4, dtype=torch.bool)})
    _, plain = objective(emb, {"text_mask": mask})
    # exact: with no generated text in the batch the term takes the scalar temperature, the very
    # path of a batch without the flag, on the same embeddings
    assert float(human["vt_milnce"]) == float(plain["vt_milnce"]) == pytest.approx(
        float(mil_nce_loss(emb["video_vat"], emb["text_vat"], 0.07, candidate_mask=mask)))
    with pytest.raises(ConfigError, match="terms\\[0\\] 'va_nce': generated_temperature needs"):
        Objective([{"name": "va_nce", "loss": "nce", "inputs": ["video_va", "audio_va"],
                    "generated_temperature": 0.1}])
    with pytest.raises(ConfigError, match="generated_temperature 5.0 is outside"):
        Objective([{"name": "vt", "loss": "nce", "inputs": ["video_vat", "text_vat"], "generated_temperature": 5.0}])


def test_pretraining_on_human_and_generated_texts(pseudo_shards, tmp_path):
    from mmvssl.config import load_config
    from mmvssl.resources import data_path
    from mmvssl.train.engine import pretrain
    cfg = load_config(data_path("configs", "demo", "tiny.yaml"), [
        f"data.shards={pseudo_shards}", "data.batch_size=4", "data.num_workers=0", "data.size=32",
        "data.num_frames=4", "data.text_sources=[human,pseudo]",
        "train.max_steps=2", "train.log_every=1", "train.warmup_steps=1", "train.log_with=none",
        f"train.output_dir={tmp_path}"])
    cfg.objective.terms[1].generated_temperature = 0.2  # vt_milnce (a dotted override cannot index a list)
    pretrain(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["vt_milnce"] for r in rows]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
