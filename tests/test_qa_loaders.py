"""Video QA data: MSRVTT-QA JSON Lines and MSVD-QA (original json + youtube_mapping, and JSON Lines), on the real
excerpts and on fixtures written here; answers outside the vocabulary; the original's exclusions; bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataloaders.raw_video_text import AnnotationError
from dataloaders.video_qa import (
    IGNORE_LABEL,
    MSRVTT_QA_EXCLUDED_VIDEOS,
    QAItem,
    majority_answer,
    qa_dataset,
    read_ans2label,
    read_qa_file,
    read_youtube_mapping,
)
from engine.sampler import eval_shard
from engine.tasks.video_qa import qa_record
from modules.tokenization import ClipTokenizer
from tests.real_fixtures import REAL_FIXTURES, needs_real
from tests.test_video import write_index_video

SMALL = dict(max_words=16, max_frames=4, image_size=16, feature_framerate=1)


@needs_real("msrvtt_qa")
def test_real_msrvtt_qa_excerpt_and_its_answer_vocabulary():
    real = REAL_FIXTURES / "msrvtt_qa"
    items = read_qa_file(real / "val.jsonl")
    assert not (real / "val.jsonl").read_bytes().endswith(b"\n")  # no newline after the last line
    assert items[0] == QAItem("video6513", "what are three people sitting on?", "couch", "what",
                              f"{real / 'val.jsonl'}:1")
    assert all(item.question.endswith("?") and item.answer_type for item in items)
    ans2label = read_ans2label(real / "train_ans2label.json")
    assert len(ans2label) == 1500 and ans2label["accept"] == 0 and "actres" in ans2label
    # the count docs/training.md §5 gives: answers of the excerpt outside the real vocabulary
    assert [item.answer for item in items if item.answer not in ans2label] == ["lip", "extreme", "biking"]
    assert len(items) == 35
    outside = [item.answer for item in items if item.answer not in ans2label]
    assert outside == ["lip", "extreme", "biking"]  # docs/data.md §5.1's examples: not training answers


@needs_real("msvd_qa")
def test_real_msvd_qa_excerpt_maps_numbers_to_clip_ids():
    real = REAL_FIXTURES / "msvd_qa"
    mapping = read_youtube_mapping(real / "youtube_mapping.txt")
    assert mapping["vid1"] == "-4wsuPCjDBc_5_15"
    items = read_qa_file(real / "train_qa.json", mapping)
    assert items[0].video_id == "-4wsuPCjDBc_5_15" and items[0].answer == "animal"
    assert items[0].question == "what is chewing on a nut?" and items[0].answer_type is None
    for name in ("val_qa.json", "test_qa.json"):
        assert all(item.video_id in mapping.values() for item in read_qa_file(real / name, mapping))
    with pytest.raises(AnnotationError, match="give youtube_mapping.txt"):
        read_qa_file(real / "train_qa.json")


def write_jsonl(path: Path, records: list[dict], final_newline: bool = False) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + ("\n" if final_newline else ""))
    return path


def test_malformed_lines_name_the_file_and_line(tmp_path):
    good = {"answer": "dog", "question": "what runs?", "video_id": "video1", "answer_type": "what"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(AnnotationError, match=r"train.jsonl, line 2: not valid JSON"):
        read_qa_file(path)
    write_jsonl(path, [good, {"answer": "", "question": "what?", "video_id": "video2"}])
    with pytest.raises(AnnotationError, match=r"train.jsonl:2: missing or empty answer"):
        read_qa_file(path)
    broken = tmp_path / "test_qa.json"
    broken.write_text('[{"answer":"a","id":0,"question":"q?","video_id":"vid1"}]')
    with pytest.raises(AnnotationError, match=r"test_qa.json\[0\]: video_id must be an int"):
        read_qa_file(broken, {"vid1": "clip"})
    broken.write_text('[{"answer":"a","id":0,"question":"q?","video_id":7}]')
    with pytest.raises(AnnotationError, match="vid7 is not in youtube_mapping.txt"):
        read_qa_file(broken, {"vid1": "clip"})
    (tmp_path / "ans.json").write_text('{"a": 0, "b": 2}')
    with pytest.raises(AnnotationError, match="class indices must be 0..1"):
        read_ans2label(tmp_path / "ans.json")


@pytest.fixture()
def msrvtt_qa(tmp_path) -> dict[str, Path]:
    videos = tmp_path / "videos"
    videos.mkdir()
    for number in (1, 2, 710):
        write_index_video(videos / f"video{number}.mp4", n_frames=8, fps=4)
    records = [
        {"answer": "dog", "question": "what runs?", "video_id": "video1", "answer_type": "what"},
        {"answer": "man", "question": "who sings?", "video_id": "video2", "answer_type": "who"},
        {"answer": "lip", "question": "what moves?", "video_id": "video2", "answer_type": "what"},  # not a label
        {"answer": "cat", "question": "what sits?", "video_id": "video710", "answer_type": "what"},  # excluded
        {"answer": "hand-feeding", "question": "what happens?", "video_id": "video1", "answer_type": "what"},
    ]
    (tmp_path / "ans2label.json").write_text(json.dumps({"cat": 0, "dog": 1, "hand-feeding": 2, "man": 3}))
    return {"test": write_jsonl(tmp_path / "test.jsonl", records), "videos": videos,
            "ans2label": tmp_path / "ans2label.json"}


def test_classifier_labels_exclusions_and_out_of_vocabulary_answers(msrvtt_qa):
    ans2label = read_ans2label(msrvtt_qa["ans2label"])
    data = qa_dataset(msrvtt_qa["test"], msrvtt_qa["videos"], ans2label=ans2label, head="classifier",
                      excluded=MSRVTT_QA_EXCLUDED_VIDEOS, tokenizer=ClipTokenizer(), **SMALL)
    assert [item.video_id for item in data.items] == ["video1", "video2", "video2", "video1"]  # video710 dropped
    sample = data[0]
    assert sample["label"] == 1 and sample["video_id"] == "video1"
    tokenizer = ClipTokenizer()
    assert sample["input_ids"].tolist() == tokenizer.encode("what runs?", 16)[0]
    assert sample["qa_input_ids"].tolist() == tokenizer.encode("what runs? dog", 16)[0]
    assert sample["video_mask"].tolist() == [1, 1, 1, 1]  # short video up-sampled: every entry a real frame
    assert data[2]["label"] == IGNORE_LABEL  # "lip" is not a training answer
    # evaluation: the out-of-vocabulary question is wrong whatever is predicted, and its share is reported
    predictions = {0: (1, 0.9), 1: (3, 0.8), 2: (0, 0.5), 3: (2, 0.7)}
    record, rows = qa_record(data, predictions, {v: k for k, v in ans2label.items()}, majority="dog")
    assert record["accuracy"] == 75.0 and record["n"] == 4 and record["out_of_vocab"] == 25.0
    assert record["majority_baseline"] == 25.0
    assert record["by_type"] == {"what": {"accuracy": pytest.approx(200 / 3), "n": 3}, "who": {"accuracy": 100.0, "n": 1}}
    assert rows[3]["prediction"] == "hand-feeding" and rows[2]["correct"] is False


def test_first_token_head_labels_the_first_bpe_piece_as_the_original(msrvtt_qa):
    ans2label = read_ans2label(msrvtt_qa["ans2label"])
    data = qa_dataset(msrvtt_qa["test"], msrvtt_qa["videos"], ans2label=ans2label, head="first_token",
                      tokenizer=ClipTokenizer(), **SMALL)
    tokenizer = ClipTokenizer()
    multi_piece = data.items.index(next(i for i in data.items if i.answer == "hand-feeding"))
    pieces = tokenizer.bpe_ids("hand-feeding")
    assert len(pieces) > 1 and data[multi_piece]["label"] == pieces[0]
    assert data[2]["label"] == tokenizer.bpe_ids("lip")[0]  # every answer has a first piece
    record, rows = qa_record(data, {multi_piece: (pieces[0], 0.5)}, {}, majority="dog")
    assert record["accuracy"] == 100.0 and rows[0]["prediction"] == tokenizer.decode([pieces[0]])


def test_msvd_qa_both_formats_find_avi_clips_by_name(tmp_path):
    clips = tmp_path / "YouTubeClips"
    clips.mkdir()
    write_index_video(clips / "-_hbPLsZvvo_19_25.avi", n_frames=8, fps=4)
    (tmp_path / "youtube_mapping.txt").write_text("-_hbPLsZvvo_19_25 vid1\nzz_-x_1_2 vid2")
    (tmp_path / "test_qa.json").write_text('[{"answer":"3\\/4","id":0,"question":"what size?","video_id":1}]')
    write_jsonl(tmp_path / "test.jsonl", [{"answer": "3/4", "question": "what size?", "video_id": "vid1"}])
    for name in ("test_qa.json", "test.jsonl"):
        data = qa_dataset(tmp_path / name, clips, ans2label={"3/4": 0}, head="classifier",
                          youtube_mapping=tmp_path / "youtube_mapping.txt", tokenizer=ClipTokenizer(), **SMALL)
        assert data.items[0].video_id == "-_hbPLsZvvo_19_25" and data.items[0].answer == "3/4"
        assert data[0]["label"] == 0 and data[0]["video"].shape[0] == 4


def test_majority_answer_and_rank_shares():
    items = [QAItem("v", "q", answer, None, "") for answer in ["b", "a", "b", "a", "c"]]
    assert majority_answer(items) == "a"  # a tie goes to the alphabetically first
    for count in (0, 1, 7, 10):
        for world in (1, 2, 3):
            shares = [eval_shard(count, world, rank) for rank in range(world)]
            assert [i for share in shares for i in share] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
