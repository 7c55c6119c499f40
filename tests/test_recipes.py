"""Dataset recipes: each converter on small files written here in the official format, with the
awkward rows of real releases (missing videos, duplicate ids, non-ASCII captions, empty ASR
segments, bad tags, comment lines, undecodable bytes). Every awkward row must be reported with
its file and line (or JSON item); nothing may crash, nothing may be dropped in silence."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from mmvssl.cli import main
from mmvssl.data.recipes import convert_dataset
from mmvssl.data.shards import BuildReport, read_entries
from mmvssl.errors import MmvsslError


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _problems(report: dict, file: str) -> list[dict]:
    return [p for p in report["problems"] if p["file"] == file]


def _touch(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"\0")


def test_kinetics_csv_splits_duplicates_missing_videos_and_the_cli(tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("label,youtube_id,time_start,time_end,split\n"
                     "abseiling,---QUuC4vJs,3,13,train\n"
                     "\"passing American football (in game)\",abc123,10,20,train\n"
                     "abseiling,---QUuC4vJs,3,13,train\n"      # line 4: duplicate clip
                     ",noLabel01,0,10,train\n"                  # line 5: no label
                     "air drumming,badTimes,20,10,train\n")     # line 6: end before start
    val = tmp_path / "validate.csv"
    val.write_text("label,youtube_id,time_start,time_end,split\nair drumming,vAl1,0,10,val\n")
    test = tmp_path / "test.csv"
    test.write_text("youtube_id,time_start,time_end,split\nt3st,5,15,test\n")
    videos = tmp_path / "videos"
    _touch(videos, "train/---QUuC4vJs_000003_000013.mp4")
    _touch(videos, "somewhere/else/vAl1_000000_000010.mp4")  # found by stem
    out = tmp_path / "out"
    assert main(["datasets", "convert", "kinetics400", str(train), str(val), str(test), "--out", str(out),
                 "--videos", str(videos)]) in (0, None)
    printed = capsys.readouterr().out
    assert "problem rows" in printed and "train.csv:4" in printed
    report = json.loads((out / "convert_report.json").read_text())
    lines = {p["line"]: p["reason"] for p in _problems(report, "train.csv") if "line" in p}
    assert "duplicate" in lines[4] and "no label" in lines[5] and "not after" in lines[6]
    missing = [p for p in report["problems"] if "video not found" in p["reason"]]
    assert {(p["file"], p["line"]) for p in missing} == {("train.csv", 3), ("test.csv", 2)}
    entries = _jsonl(out / "captions.jsonl")
    assert [e["video"] for e in entries] == ["train/---QUuC4vJs_000003_000013.mp4",
                                              "somewhere/else/vAl1_000000_000010.mp4"]
    assert entries[0]["label"] == "abseiling" and entries[1]["split"] == "val"
    assert (out / "splits" / "val.txt").read_text() == "vAl1_000000_000010\n"
    # without --videos: every clip, official layout, and a video2dataset list with the clip windows
    report = convert_dataset("kinetics400", [train, val, test], tmp_path / "all")
    assert report["entries"] == 4 and report["splits"] == {"train": 2, "val": 1, "test": 1}
    rows = list(csv.DictReader(open(tmp_path / "all" / "video2dataset.csv")))
    assert rows[1]["url"].endswith("abc123") and json.loads(rows[1]["clips"]) == [[10, 20]]
    assert _jsonl(tmp_path / "all" / "captions.jsonl")[1]["label"] == "passing American football (in game)"
    # the shards builder accepts the converted file as it is
    accepted = read_entries(tmp_path, tmp_path / "all" / "captions_train.jsonl", BuildReport())
    assert len(accepted) == 2


def test_ucf101_three_splits_from_the_official_lists(tmp_path):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n")
    for k in (1, 2, 3):
        tr = "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 2\n"
        te = "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nHandstandPushups/v_HandStandPushups_g01_c01.avi\n"
        if k == 1:
            te += "Unknown/v_Unknown_g01_c01.avi\n"                      # line 3: class not in classInd
            te += "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\n"        # line 4: also in trainlist01
        if k == 2:
            tr, te = te.replace(".avi\n", ".avi 1\n").replace("HandStandPushups_g01_c01.avi 1",
                                                               "HandStandPushups_g01_c01.avi 2"), tr.replace(" 1", "").replace(" 2", "")
        (lists / f"trainlist0{k}.txt").write_text(tr)
        (lists / f"testlist0{k}.txt").write_text(te)
    report = convert_dataset("ucf101", [lists], tmp_path / "out")
    entries = {e["id"]: e for e in _jsonl(tmp_path / "out" / "captions.jsonl")}
    assert len(entries) == 4
    e = entries["v_HandStandPushups_g08_c01"]
    assert e["video"] == "HandstandPushups/v_HandStandPushups_g08_c01.avi" and e["label"] == "HandstandPushups"
    assert (e["split1"], e["split2"], e["split3"]) == ("train", "test", "train")
    assert entries["v_ApplyEyeMakeup_g01_c01"]["split2"] == "train"
    lines = {p["line"]: p["reason"] for p in _problems(report, "testlist01.txt")}
    assert "not in classInd" in lines[3] and "already in split 1's train" in lines[4]
    # the group (CoCLR's video_source.json key) is each clip's video_id
    assert {i: e["video_id"] for i, e in entries.items()} == {
        "v_ApplyEyeMakeup_g08_c01": "v_ApplyEyeMakeup_g08", "v_HandStandPushups_g08_c01": "v_HandStandPushups_g08",
        "v_ApplyEyeMakeup_g01_c01": "v_ApplyEyeMakeup_g01", "v_HandStandPushups_g01_c01": "v_HandStandPushups_g01"}


def test_ucf101_sibling_clips_share_their_group_as_video_id(tmp_path):
    """v_X_g08_c01 and _c02 are clips of one video (UCF101's groups): one video_id, which coclr reads
    for its same-video positives; another group or class is another video; a name not of the form
    v_<Class>_gXX_cYY gets no video_id and is reported."""
    from mmvssl.data.recipes.actions import ucf101_group
    from mmvssl.methods.coclr import video_ids
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Archery\n2 Biking\n")
    names = ["Archery/v_Archery_g08_c01.avi", "Archery/v_Archery_g08_c02.avi", "Archery/v_Archery_g08_c07.avi",
             "Archery/v_Archery_g09_c01.avi", "Biking/v_Biking_g08_c01.avi", "Biking/odd_name.avi"]
    (lists / "trainlist01.txt").write_text("".join(f"{n} 1\n" if n.startswith("Archery") else f"{n} 2\n"
                                                   for n in names))
    (lists / "testlist01.txt").write_text("")
    report = convert_dataset("ucf101", [lists], tmp_path / "out")
    entries = _jsonl(tmp_path / "out" / "captions.jsonl")
    groups = [e.get("video_id") for e in entries]
    assert groups == ["v_Archery_g08"] * 3 + ["v_Archery_g09", "v_Biking_g08", None]
    odd = [p for p in _problems(report, "trainlist01.txt") if "odd_name" in p["reason"]]
    assert len(odd) == 1 and odd[0]["line"] == 6 and odd[0]["action"] == "kept"
    ids = video_ids({"key": [e["id"] for e in entries], "meta": entries}).tolist()
    assert ids[0] == ids[1] == ids[2] and len(set(ids[2:])) == 4  # siblings one video, the rest apart
    assert ucf101_group("v_YoYo_g25_c05") == "v_YoYo_g25" and ucf101_group("v_YoYo_g25") is None


def test_hmdb51_tags_0_1_2_and_bad_rows(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    for k in (1, 2, 3):
        (splits / f"brush_hair_test_split{k}.txt").write_text(
            "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \nBlonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi 2 \n"
            "Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0.avi 0 \n" + ("odd_line_without_tag.avi\n" if k == 1 else ""))
    (splits / "chew_test_split1.txt").write_text("Chewing_Gum_chew_h_nm_np1_fr_med_0.avi 2 \n")  # splits 2, 3 missing
    report = convert_dataset("hmdb51", [splits], tmp_path / "out")
    entries = {e["id"]: e for e in _jsonl(tmp_path / "out" / "captions.jsonl")}
    e = entries["Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0"]
    assert (e["label"], e["split1"], e["split3"]) == ("brush_hair", "unused", "unused")
    assert entries["Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0"]["split2"] == "test"
    assert _problems(report, "brush_hair_test_split1.txt")[0]["line"] == 4
    assert {p["file"] for p in report["problems"] if "missing" in p["reason"]} == {"chew_test_split2.txt",
                                                                                     "chew_test_split3.txt"}


def test_esc50_five_folds(tmp_path):
    meta = tmp_path / "esc50.csv"
    meta.write_text("filename,fold,target,category,esc10,src_file,take\n"
                    "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
                    "2-100038-A-14.wav,2,14,chirping_birds,False,100038,A\n"
                    "6-1-A-0.wav,6,0,dog,True,1,A\n"              # line 4: fold 6
                    "1-100032-A-0.wav,1,0,dog,True,100032,A\n"    # line 5: duplicate
                    "5-9032-A-0.wav,5,,dog,True,9032,A\n")        # line 6: empty target
    report = convert_dataset("esc50", [meta], tmp_path / "out")
    entries = _jsonl(tmp_path / "out" / "captions.jsonl")
    assert [(e["label"], e["fold"], e["video"]) for e in entries] == [("dog", 1, "audio/1-100032-A-0.mp4"),
                                                                        ("chirping_birds", 2, "audio/2-100038-A-14.mp4")]
    lines = {p["line"]: p["reason"] for p in report["problems"]}
    assert set(lines) == {4, 5, 6} and "1-5" in lines[4] and "duplicate" in lines[5] and "target" in lines[6]


def test_msrvtt_json_and_the_1k_a_csv(tmp_path):
    info = tmp_path / "train_val_videodatainfo.json"
    info.write_text(json.dumps({
        "videos": [{"category": 9, "url": "https://www.youtube.com/watch?v=9lZi22qLlEo", "video_id": "video0",
                    "start time": 137.72, "end time": 149.44, "split": "train", "id": 0},
                   {"category": 16, "url": "u", "video_id": "video1", "start time": 0, "end time": 9, "split": "validate",
                    "id": 1},
                   {"category": 3, "video_id": "video0", "split": "train", "id": 2},   # duplicate
                   {"category": 3, "split": "train", "id": 3}],                          # no video_id
        "sentences": [{"caption": "a car is shown", "video_id": "video0", "sen_id": 0},
                      {"caption": "une voiture rouge — très rapide", "video_id": "video0", "sen_id": 1},
                      {"caption": "", "video_id": "video1", "sen_id": 2},
                      {"caption": "ghost", "video_id": "video99", "sen_id": 3}]}, ensure_ascii=False))
    jsf = tmp_path / "MSRVTT_JSFUSION_test.csv"
    jsf.write_text("key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl wearing red top and black trouser "
                   "is putting a sweater on a dog\nret1,msr7725,video7725,young people sit around the edges of a "
                   "room clapping and raising their arms while others dance in the center during a party\n",
                   encoding="utf-8")
    report = convert_dataset("msrvtt", [info, jsf], tmp_path / "out")
    entries = {e["id"]: e for e in _jsonl(tmp_path / "out" / "captions.jsonl")}
    assert entries["video0"]["captions"] == ["a car is shown", "une voiture rouge — très rapide"]
    assert entries["video0"]["caption"] == "a car is shown" and entries["video0"]["split"] == "train"
    test = _jsonl(tmp_path / "out" / "captions_test_1k_a.jsonl")
    assert [(e["video"], e["caption"][:10]) for e in test] == [("video7579.mp4", "a girl wea"),
                                                               ("video7725.mp4", "young peop")]
    items = {p["item"]: p["reason"] for p in report["problems"]}
    assert "duplicate" in items["videos[2]"] and "video_id" in items["videos[3]"]
    assert "empty" in items["sentences[2]"] and "unknown video" in items["sentences[3]"]
    assert "no caption" in items["videos[1]"]


def test_youcook2_segments_become_clips(tmp_path):
    ann = tmp_path / "youcookii_annotations_trainval.json"
    ann.write_text(json.dumps({"database": {
        "GLd3aX16zBg": {"duration": 241.62, "subset": "training", "recipe_type": "113",
                        "video_url": "https://www.youtube.com/watch?v=GLd3aX16zBg",
                        "annotations": [{"segment": [90, 102], "id": 0, "sentence": "spread margarine on two slices"},
                                        {"segment": [114, 127], "id": 1, "sentence": ""},
                                        {"segment": [130, 120], "id": 2, "sentence": "inverted"}]},
        "xHr8X2Wpmno": {"duration": 100.0, "subset": "validation", "recipe_type": "101",
                        "video_url": "https://www.youtube.com/watch?v=xHr8X2Wpmno",
                        "annotations": [{"segment": [5, 15], "id": 0, "sentence": "ajouter le sel — 塩を加える"}]}}}))
    report = convert_dataset("youcook2", [ann], tmp_path / "out")
    val = _jsonl(tmp_path / "out" / "captions_val.jsonl")
    assert val == [{"id": "xHr8X2Wpmno_0", "video": "val/xHr8X2Wpmno_0.mp4", "caption": "ajouter le sel — 塩を加える",
                    "split": "val", "youtube_id": "xHr8X2Wpmno", "clip": [5.0, 15.0], "recipe_type": "101"}]
    items = {p["item"]: p["reason"] for p in report["problems"]}
    assert "empty" in items["database.GLd3aX16zBg.annotations[1]"]
    assert "start < end" in items["database.GLd3aX16zBg.annotations[2]"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "video2dataset.csv", encoding="utf-8")))
    assert json.loads(rows[0]["clips"]) == [[90.0, 102.0]] and rows[1]["id"] == "xHr8X2Wpmno_0"


def _ek100_files(tmp_path):
    root = tmp_path / "retrieval_annotations"
    root.mkdir()
    head = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
            "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n")
    (root / "EPIC_100_retrieval_test.csv").write_text(
        head + "P01_11_0,P01,P01_11,00:00:00.560,00:00:00.14,00:00:03.37,8,202,take plate,take,0,plate,2,['plate'],[2]\n"
        "P01_11_1,P01,P01_11,00:00:04.00,00:00:04.00,00:00:06.50,240,390,put plate,put,1,plate,2,['plate'],[2]\n"
        "P01_11_2,P01,P01_11,00:00:07.00,00:00:09.00,00:00:08.00,540,480,open tap,open,3,tap,8,['tap'],[8]\n")
    (root / "EPIC_100_retrieval_test_sentence.csv").write_text(
        "narration_id,narration\nP01_11_0,take plate\nP01_11_1,put plate\nP01_11_2,open tap\n")
    rel = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    (root / "relevancy").mkdir()
    with open(root / "relevancy" / "caption_relevancy_EPIC_100_retrieval_test.pkl", "wb") as f:
        pickle.dump(rel, f)
    return root, rel


def test_ek100_mir_clips_and_the_relevancy_converted_once_without_pickle_at_eval(tmp_path, capsys):
    root, rel = _ek100_files(tmp_path)
    files = [root / "EPIC_100_retrieval_test.csv", root / "EPIC_100_retrieval_test_sentence.csv"]
    pkl = root / "relevancy" / "caption_relevancy_EPIC_100_retrieval_test.pkl"
    with pytest.raises(MmvsslError, match="--allow-pickle"):
        convert_dataset("ek100-mir", files, tmp_path / "no", relevancy=pkl)
    report = convert_dataset("ek100-mir", files, tmp_path / "out", relevancy=pkl, allow_pickle=True)
    assert "WARNING: unpickling" in capsys.readouterr().err
    entries = _jsonl(tmp_path / "out" / "captions.jsonl")
    assert [(e["id"], e["clip"], e["video"], e["source_video"]) for e in entries] == [
        ("P01_11_0", [0.14, 3.37], "clips/P01_11_0.mp4", "P01/videos/P01_11.MP4"),
        ("P01_11_1", [4.0, 6.5], "clips/P01_11_1.mp4", "P01/videos/P01_11.MP4")]
    assert report["problems"][0]["line"] == 4 and "not after" in report["problems"][0]["reason"]
    from mmvssl.evaluation.retrieval import load_relevancy
    loaded = load_relevancy(tmp_path / "out" / "relevancy.npz")  # allow_pickle=False inside
    assert loaded["keys"] == ["P01_11_0", "P01_11_1", "P01_11_2"] and loaded["texts"][2] == "open tap"
    assert np.allclose(loaded["relevancy"].numpy(), rel)


def test_ek100_relevancy_pickle_that_names_anything_but_an_array_is_refused(tmp_path):
    root, _ = _ek100_files(tmp_path)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Path("/etc/passwd")))  # any class other than a numpy array
    with pytest.raises(MmvsslError, match="not a pickled numpy array"):
        convert_dataset("ek100-mir", [root / "EPIC_100_retrieval_test.csv", root / "EPIC_100_retrieval_test_sentence.csv"],
                        tmp_path / "out", relevancy=evil, allow_pickle=True)


def test_ego4d_narrations_with_egovlp_windows(tmp_path):
    path = tmp_path / "narration.json"
    path.write_text(json.dumps({
        "uid-a": {"narration_pass_1": {"narrations": [
            {"timestamp_sec": 2.0, "timestamp_frame": 60, "narration_text": "#C C picks a bag", "annotation_uid": "x"},
            {"timestamp_sec": 6.0, "timestamp_frame": 180, "narration_text": "", "annotation_uid": "y"},
            {"timestamp_sec": 4.0, "timestamp_frame": 120, "narration_text": "#C C opens the fridge", "annotation_uid": "z"}],
            "summaries": []}, "status": "complete"},
        "uid-b": {"narration_pass_1": {"narrations": [
            {"timestamp_sec": 1.0, "narration_text": "#C C cuts a carrot"},
            {"timestamp_sec": 7.0, "narration_text": "#C C cuts a carrot"}]}},
        "uid-c": {"status": "redacted"}}))
    report = convert_dataset("ego4d", [path], tmp_path / "out")
    entries = {e["id"]: e for e in _jsonl(tmp_path / "out" / "captions.jsonl")}
    alpha = (2.0 + 6.0) / 2  # mean gap of uid-a (2 s) and uid-b (6 s)
    a = entries["uid-a"]["narrations"]
    assert [n["text"] for n in a] == ["#C C picks a bag", "#C C opens the fridge"]  # sorted by time
    assert a[0]["start"] == pytest.approx(2.0 - 2.0 / (2 * alpha)) and a[0]["end"] == pytest.approx(2.0 + 2.0 / (2 * alpha))
    assert entries["uid-b"]["narrations"][1]["end"] == pytest.approx(7.0 + 6.0 / (2 * alpha))
    items = {p["item"]: p["reason"] for p in report["problems"]}
    assert "empty" in items["uid-a.narration_pass_1.narrations[1]"] and "no usable" in items["uid-c"]


def test_howto100m_asr_segments(tmp_path):
    cap = tmp_path / "caption.json"
    cap.write_text(json.dumps({
        "--6bJUbfpnQ": {"start": [0.0, 3.5, 7.2, 9.0], "end": [4.1, 7.9, 6.0, 12.0],
                        "text": ["you're gonna need", "", "inverted", "café crème brûlée"]},
        "empty_vid": {"start": [1.0], "end": [2.0], "text": ["   "]},
        "uneven": {"start": [1.0, 2.0], "end": [2.0], "text": ["a", "b"]}}, ensure_ascii=False))
    meta = tmp_path / "HowTo100M_v1.csv"
    meta.write_text("video_id,category_1,category_2,rank,task_id\n--6bJUbfpnQ,Food and Entertaining,Recipes,27,52907\n")
    report = convert_dataset("howto100m", [cap, meta], tmp_path / "out")
    entries = {e["id"]: e for e in _jsonl(tmp_path / "out" / "captions.jsonl")}
    n = entries["--6bJUbfpnQ"]["narrations"]
    assert [x["text"] for x in n] == ["you're gonna need", "café crème brûlée"]
    assert entries["--6bJUbfpnQ"]["category_1"] == "Food and Entertaining"
    assert entries["uneven"]["narrations"] == [{"start": 1.0, "end": 2.0, "text": "a"}]
    items = {p["item"]: p["reason"] for p in report["problems"]}
    assert items["--6bJUbfpnQ[1]"] == "empty ASR segment" and "before it starts" in items["--6bJUbfpnQ[2]"]
    assert items["empty_vid[0]"] == "empty ASR segment" and "no usable" in items["empty_vid"]
    assert "lengths differ" in items["uneven"]
    assert read_entries(tmp_path, tmp_path / "out" / "captions.jsonl", BuildReport())  # narrations valid for shards


def test_webvid_csv_in_either_column_order(tmp_path):
    two = tmp_path / "results_2M_val.csv"
    two.write_text("videoid,contentUrl,duration,page_dir,name\n"
                   "31353427,https://ak.picdn.net/a.mp4,PT00H00M15S,1052441_1,\"Aerial shot, winter forest\"\n"
                   "31353427,https://ak.picdn.net/a.mp4,PT00H00M15S,1052441_1,dup\n")
    ten = tmp_path / "results_10M_train.csv"
    ten.write_bytes("videoid,name,page_idx,page_dir,duration,contentUrl\n"
                    "1,Ночной город,5,006_1,PT00H00M10S,https://x/1.mp4\n".encode()
                    + b"2,caf\xe9 latte,5,006_1,PT00H00M10S,https://x/2.mp4\n"   # latin-1 byte
                    + b"3,,5,006_1,PT00H00M10S,https://x/3.mp4\n")                  # empty name
    report = convert_dataset("webvid", [two, ten], tmp_path / "out")
    entries = _jsonl(tmp_path / "out" / "captions.jsonl")
    assert [(e["video"], e["caption"]) for e in entries][:2] == [("1052441_1/31353427.mp4", "Aerial shot, winter forest"),
                                                                ("006_1/1.mp4", "Ночной город")]
    assert entries[2]["caption"] == "caf\ufffd latte"
    got = {(p["file"], p["line"], p["action"]) for p in report["problems"]}
    assert got == {("results_2M_val.csv", 3, "skipped"), ("results_10M_train.csv", 3, "kept"),
                   ("results_10M_train.csv", 4, "skipped")}


def test_audioset_segment_csv_with_comment_header_and_quoted_labels(tmp_path):
    seg = tmp_path / "balanced_train_segments.csv"
    seg.write_text("# Segments csv created Sun Mar  5 10:54:31 2017\n"
                   "# num_ytids=22160, num_segs=22160, num_unique_labels=527, num_positive_labels=52882\n"
                   "# YTID, start_seconds, end_seconds, positive_labels\n"
                   "--PJHxphWEs, 30.000, 40.000, \"/m/09x0r,/t/dd00088\"\n"
                   "--ZhevVpy1s, 50.000, 60.000, \"/m/012xff\"\n"
                   "--PJHxphWEs, 30.000, 40.000, \"/m/09x0r\"\n"   # line 6: duplicate segment
                   "broken, thirty, 40.000, \"/m/09x0r\"\n")       # line 7
    names = tmp_path / "class_labels_indices.csv"
    names.write_text("index,mid,display_name\n0,/m/09x0r,\"Speech\"\n1,/t/dd00088,\"Gush\"\n")
    report = convert_dataset("audioset", [seg, names], tmp_path / "out")
    entries = _jsonl(tmp_path / "out" / "captions.jsonl")
    assert entries[0]["id"] == "--PJHxphWEs_30000" and entries[0]["labels"] == ["Speech", "Gush"]
    assert entries[0]["split"] == "balanced_train" and entries[1]["labels"] == ["/m/012xff"]
    lines = {p["line"]: (p["reason"], p["action"]) for p in report["problems"]}
    assert "not in class_labels" in lines[5][0] and lines[5][1] == "kept"
    assert "duplicate" in lines[6][0] and "not numbers" in lines[7][0]


def test_unknown_dataset_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(MmvsslError, match="unknown dataset"):
        convert_dataset("imagenet", [tmp_path], tmp_path / "o")
    with pytest.raises(MmvsslError, match="not found"):
        convert_dataset("webvid", [tmp_path / "nope.csv"], tmp_path / "o")
    bad = tmp_path / "train.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(MmvsslError, match="header lacks"):
        convert_dataset("kinetics700", [bad], tmp_path / "o")


def test_mir_finds_the_relevancy_rows_by_the_converted_id(tmp_path):
    import torch

    from mmvssl.evaluation.retrieval import load_relevancy, mir_from_relevancy
    root, rel = _ek100_files(tmp_path)
    convert_dataset("ek100-mir", [root / "EPIC_100_retrieval_test.csv", root / "EPIC_100_retrieval_test_sentence.csv"],
                    tmp_path / "out", relevancy=root / "relevancy" / "caption_relevancy_EPIC_100_retrieval_test.pkl",
                    allow_pickle=True)
    relevancy = load_relevancy(tmp_path / "out" / "relevancy.npz")
    eye = torch.eye(3, dtype=torch.float64)
    emb = {"keys": ["000000002", "000000000", "000000001"],  # shard keys in another order
           "metas": [{"id": "P01_11_2"}, {"id": "P01_11_0"}, {"id": "P01_11_1"}], "video_vat": eye[[2, 0, 1]]}
    m = mir_from_relevancy(emb, relevancy, torch.from_numpy(rel))  # similarity = relevancy: a perfect ranking
    assert m["mAP"]["avg"] == pytest.approx(100.0) and m["nDCG"]["avg"] == pytest.approx(100.0)


def test_wrap_audio_makes_mp4s_that_shards_build_accepts(tmp_path, capsys):
    import wave

    from mmvssl.data.decode import decode_audio, probe
    audio = tmp_path / "ESC-50-master" / "audio"
    audio.mkdir(parents=True)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(1.5 * 8000)) / 8000) * 32767).astype(np.int16)
    with wave.open(str(audio / "1-100032-A-0.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(tone.tobytes())
    (audio / "5-9032-A-0.wav").write_bytes(b"RIFF not really a wave file")
    out = tmp_path / "wrapped"
    assert main(["datasets", "wrap-audio", str(audio), "--out", str(out), "--rate", "16000"]) in (0, None)
    printed = capsys.readouterr().out
    assert "1 written" in printed and "1 failed" in printed and "5-9032-A-0.wav" in printed
    data = (out / "1-100032-A-0.mp4").read_bytes()
    info = probe(data)
    assert info.has_audio and info.duration == pytest.approx(1.5, abs=0.15)
    heard = decode_audio(data, 0.2, 1.0, 16000)
    assert np.abs(heard).max() > 0.1  # the tone is there, not silence
    assert main(["datasets", "wrap-audio", str(audio), "--out", str(out)]) in (0, None)
    assert "1 already there" in capsys.readouterr().out
    from mmvssl.data.shards import build_shards
    assert build_shards(out, tmp_path / "shards")["num_accepted"] == 1


def test_cut_writes_the_clips_a_conversion_names(tmp_path, demo_data, capsys):
    import shutil

    from mmvssl.data.decode import probe
    root, _ = _ek100_files(tmp_path)
    src = tmp_path / "EPIC-KITCHENS" / "P01" / "videos"
    src.mkdir(parents=True)
    shutil.copy(demo_data / "val" / "videos" / "val_000000.mp4", src / "P01_11.MP4")  # a 3 s stand-in
    out = tmp_path / "out"
    convert_dataset("ek100-mir", [root / "EPIC_100_retrieval_test.csv"], out)
    lines = (out / "captions.jsonl").read_text().splitlines()
    (out / "captions.jsonl").write_text("\n".join([*lines, json.dumps({"id": "gone", "video": "clips/gone.mp4",
                                        "clip": [0, 1], "source_video": "P09/videos/P09_01.MP4"})]) + "\n")
    assert main(["datasets", "cut", str(out / "captions.jsonl"), "--videos", str(tmp_path / "EPIC-KITCHENS"),
                 "--out", str(out), "--fps", "10", "--short-side", "32", "--audio-rate", "16000"]) in (0, None)
    printed = capsys.readouterr().out
    assert "3 clips: 2 written" in printed and "line 3 (gone): source video not found" in printed
    first = probe((out / "clips" / "P01_11_0.mp4").read_bytes())
    assert first.duration == pytest.approx(3.37 - 0.14, abs=0.15) and first.has_audio and min(first.width, first.height) == 32
    assert main(["datasets", "cut", str(out / "captions.jsonl"), "--videos", str(tmp_path / "EPIC-KITCHENS"),
                 "--out", str(out)]) in (0, None)
    assert "2 already there" in capsys.readouterr().out
    from mmvssl.data.shards import build_shards
    report = build_shards(out, tmp_path / "shards", captions=out / "captions.jsonl")
    assert report["num_accepted"] == 2 and report["num_rejected"] == 1  # the clip whose video is gone


def test_videos_downloaded_by_video2dataset_are_found_by_their_id(tmp_path):
    ann = tmp_path / "youcookii_annotations_trainval.json"
    ann.write_text(json.dumps({"database": {"vidA": {"subset": "validation", "recipe_type": "101", "annotations": [
        {"segment": [1, 4], "id": 0, "sentence": "crack the eggs"},
        {"segment": [5, 9], "id": 1, "sentence": "whisk them"}]}}}))
    shard = tmp_path / "v2d" / "00000"
    shard.mkdir(parents=True)
    # video2dataset's files output: <key>_<clip>.mp4 beside a .json carrying the saved `id` column
    (shard / "000000000_0.mp4").write_bytes(b"\0")
    (shard / "000000000_0.json").write_text(json.dumps({"id": "vidA_0", "status": "success", "clips": [[1, 4]]}))
    (shard / "000000001.json").write_text(json.dumps({"id": "vidA_1", "status": "failed_to_download",
                                                      "error_message": "Video unavailable"}))
    report = convert_dataset("youcook2", [ann], tmp_path / "out", videos=tmp_path / "v2d")
    entries = _jsonl(tmp_path / "out" / "captions.jsonl")
    assert [(e["id"], e["video"]) for e in entries] == [("vidA_0", "00000/000000000_0.mp4")]
    missing = [p for p in report["problems"] if "video not found" in p["reason"]]
    assert [(p["item"], p["action"]) for p in missing] == [("database.vidA.annotations[1]", "left out")]
