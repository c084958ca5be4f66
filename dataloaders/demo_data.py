"""Small synthetic video-text dataset for the demo, laid out exactly like MSR-VTT (and a WebVid-style csv).

Every video shows one large coloured shape moving in one direction on a plain dark background, with a fading
trail of dots behind it; its captions say which ("a red circle moves to the left"). Colour and shape are clear enough at 64 px for a tiny CLIP
trained from scratch on a CPU to learn them.

The WebVid-style pre-training set holds the MSR-VTT training videos plus `n_webvid_only` videos of its own (as real
pre-training data is larger than, and separate from, the downstream sets): a tiny CLIP pre-trained on 400 clips
learns little beyond colour, on 2000 it also tells shapes and directions apart.

    python -m dataloaders.demo_data --out demo_data
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np

from dataloaders.video_decoding import read_frames

COLOURS = {  # RGB, far apart in hue so mp4v compression cannot confuse them
    "red": (230, 20, 20),
    "green": (20, 200, 20),
    "blue": (30, 60, 255),
    "yellow": (250, 240, 20),
    "purple": (160, 30, 220),
    "cyan": (20, 220, 230),
    "orange": (255, 140, 0),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
DIRECTIONS = {  # unit motion (dx, dy) in image coordinates and the caption words
    "left": ((-1, 0), "to the left"),
    "right": ((1, 0), "to the right"),
    "up": ((0, -1), "upwards"),
    "down": ((0, 1), "downwards"),
}
COMBINATIONS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))  # (colour, shape, direction) of a video
CAPTION_TEMPLATES = (
    "{a_colour} {shape} moves {direction}",
    "{a_colour} {shape} is moving {direction}",
    "the {colour} {shape} slides {direction}",
    "{a_shape} that is {colour} moves {direction}",
    "video of {a_colour} {shape} going {direction}",
)
MARKER_NAME = ".demo_data_complete.json"
LAYOUT_VERSION = 4  # 2: validation videos and the MSVD layout; 3: MSRVTT-QA and MSVD-QA questions; 4: WebVid-only videos
WEBVID_FIRST_ID = 10_000_000
DEMO_WEBVID_ONLY = 1600  # what `tools.demo prepare` and this module's command line make: 2000 pre-training clips


def make_demo_dataset(
    out_dir: str | Path,
    n_train: int = 400,
    n_test: int = 50,
    seed: int = 0,
    size: int = 64,
    fps: int = 8,
    seconds: int = 3,
    n_val: int = 20,
    n_webvid_only: int = 0,
) -> dict[str, Path]:
    """Write the demo dataset under `out_dir` (skipped when a complete one with these settings is there).

    Train videos are `video0 .. video<n_train-1>`, test videos follow, then the validation videos (MSR-VTT's
    "validate" split, MSVD's val list). WebVid holds the train videos plus `n_webvid_only` videos found only there
    (drawn from their own random stream, so the other videos do not depend on it). Returns the paths the loaders
    need.
    """
    out_dir = Path(out_dir)
    settings = dict(n_train=n_train, n_test=n_test, seed=seed, size=size, fps=fps, seconds=seconds, n_val=n_val,
                    n_webvid_only=n_webvid_only, layout=LAYOUT_VERSION)
    paths = demo_paths(out_dir)
    marker = out_dir / MARKER_NAME
    if marker.is_file():
        if json.loads(marker.read_text()) == settings:
            return paths
        # Ours (the marker says so) but made with other settings: start clean so no stale video remains.
        shutil.rmtree(paths["msrvtt_dir"], ignore_errors=True)
        shutil.rmtree(paths["webvid_dir"], ignore_errors=True)
        for folder in ("msvd_dir", "msrvtt_qa_dir", "msvd_qa_dir"):
            shutil.rmtree(paths[folder], ignore_errors=True)
        marker.unlink()

    rng = np.random.default_rng(seed)
    videos = _plan_videos(rng, n_train, n_test)
    videos += _plan_validation_videos(np.random.default_rng([seed, 1]), len(videos), n_val)
    paths["videos_dir"].mkdir(parents=True, exist_ok=True)
    for number, video in enumerate(videos):
        video_path = paths["videos_dir"] / f"video{number}.mp4"
        _write_video(video_path, video, rng, size, fps, seconds)
        _check_decodes(video_path, fps * seconds)
    _write_msrvtt_annotations(paths, videos, rng, seconds)
    webvid_only = _write_webvid_only_videos(paths, n_train, n_webvid_only, np.random.default_rng([seed, 2]), size,
                                            fps, seconds)
    _write_webvid(paths, videos[:n_train] + webvid_only, seconds)
    _write_msvd_annotations(paths, videos)
    _write_qa_annotations(paths, videos)
    marker.write_text(json.dumps(settings))
    return paths


def demo_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where `make_demo_dataset` puts each file (MSR-VTT layout, plus WebVid-style files)."""
    root = Path(out_dir)
    msrvtt = root / "MSRVTT"
    webvid = root / "webvid"
    return {
        "root": root,
        "msrvtt_dir": msrvtt,
        "videos_dir": msrvtt / "videos" / "all",
        "data_json": msrvtt / "MSRVTT_data.json",
        "train_csv": msrvtt / "MSRVTT_train.9k.csv",
        "test_csv": msrvtt / "MSRVTT_JSFUSION_test.csv",
        "webvid_dir": webvid,
        "webvid_csv": webvid / "results_2M_train.csv",
        "webvid_videos_dir": webvid / "videos",
        "msvd_dir": root / "MSVD",
        "msrvtt_qa_dir": root / "MSRVTT-QA",
        "msvd_qa_dir": root / "MSVD-QA",
    }


def _video_record(video_id: str, combination: tuple[str, str, str], split: str) -> dict:
    """A planned video: its attributes and one caption per template."""
    colour, shape, direction = combination
    words = dict(colour=colour, shape=shape, direction=DIRECTIONS[direction][1],
                 a_colour=_with_article(colour), a_shape=_with_article(shape))
    return {"video_id": video_id, "colour": colour, "shape": shape, "direction": direction,
            "captions": [template.format(**words) for template in CAPTION_TEMPLATES], "split": split}


def _cycled_combinations(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
    """`count` attribute combinations going through all of them in a fresh random order each round."""
    rounds = -(-count // len(COMBINATIONS))
    return [COMBINATIONS[i] for _ in range(rounds) for i in rng.permutation(len(COMBINATIONS))][:count]


def _plan_videos(rng: np.random.Generator, n_train: int, n_test: int) -> list[dict]:
    """Attributes and captions of every video: train cycles through all combinations, test ones are distinct."""
    if n_test > len(COMBINATIONS):
        raise ValueError(f"n_test must be at most {len(COMBINATIONS)} so that test captions are distinct")
    train = _cycled_combinations(rng, n_train)
    test = [COMBINATIONS[i] for i in rng.permutation(len(COMBINATIONS))[:n_test]]
    return [_video_record(f"video{number}", combination, "train" if number < n_train else "test")
            for number, combination in enumerate(train + test)]


def _write_webvid_only_videos(paths: dict[str, Path], first_number: int, count: int, rng: np.random.Generator,
                              size: int, fps: int, seconds: int) -> list[dict]:
    """`count` more pre-training videos (cycling through every attribute combination), written straight to their
    place in WebVid's layout as rows `first_number`, `first_number + 1`, ... of its csv."""
    videos = []
    for offset, combination in enumerate(_cycled_combinations(rng, count)):
        video = _video_record(f"webvid_only{offset}", combination, "webvid")
        video["path"] = _webvid_file(paths, first_number + offset)
        video["path"].parent.mkdir(parents=True, exist_ok=True)
        _write_video(video["path"], video, rng, size, fps, seconds)
        _check_decodes(video["path"], fps * seconds)
        videos.append(video)
    return videos


def _plan_validation_videos(rng: np.random.Generator, first_number: int, n_val: int) -> list[dict]:
    """Validation videos (model selection for captioning): random attribute combinations, numbered after the rest."""
    choices = rng.choice(len(COMBINATIONS), size=n_val, replace=n_val > len(COMBINATIONS))
    return [_video_record(f"video{first_number + offset}", COMBINATIONS[choice], "validate")
            for offset, choice in enumerate(choices)]


def _write_msvd_annotations(paths: dict[str, Path], videos: list[dict]) -> None:
    """MSVD's CLIP4Clip layout over the same videos: `{train,val,test}_list.txt` and `raw-captions.pkl` (captions as
    word lists); the videos are found by name under the MSR-VTT video folder."""
    folder = paths["msvd_dir"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", "train"), ("val", "validate"), ("test", "test")):
        ids = [video["video_id"] for video in videos if video["split"] == split]
        (folder / f"{name}_list.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    captions = {video["video_id"]: [caption.split() for caption in video["captions"]] for video in videos}
    with (folder / "raw-captions.pkl").open("wb") as handle:
        pickle.dump(captions, handle, protocol=4)


DIRECTION_ANSWERS = {"left": "left", "right": "right", "up": "up", "down": "down"}


def demo_questions(video: dict) -> list[dict[str, str]]:
    """Questions whose answers only the video gives: its colour, its shape and where it moves (each question names
    the other attributes, never the answer). Every demo video shows a single shape, so there is no count question."""
    direction = DIRECTIONS[video["direction"]][1]
    return [
        {"question": f"what colour is the {video['shape']}?", "answer": video["colour"], "answer_type": "what"},
        {"question": f"what shape moves {direction}?", "answer": video["shape"], "answer_type": "what"},
        {"question": f"where does the {video['colour']} {video['shape']} move?",
         "answer": DIRECTION_ANSWERS[video["direction"]], "answer_type": "where"},
    ]


def _write_qa_annotations(paths: dict[str, Path], videos: list[dict]) -> None:
    """MSRVTT-QA in the ClipBERT/ALPRO JSON Lines layout (`{train,val,test}.jsonl`, `train_ans2label.json`) and
    MSVD-QA in its original layout (`{train,val,test}_qa.json` with `vid<N>` numbers, `youtube_mapping.txt`), both
    over the demo videos (train, validate and test splits as for captioning)."""
    msrvtt, msvd = paths["msrvtt_qa_dir"], paths["msvd_qa_dir"]
    msrvtt.mkdir(parents=True, exist_ok=True)
    msvd.mkdir(parents=True, exist_ok=True)
    vid_numbers = {video["video_id"]: number for number, video in enumerate(sorted(videos, key=lambda v: v["video_id"]),
                                                                             start=1)}
    mapping = "\n".join(f"{video_id} vid{number}" for video_id, number in vid_numbers.items())
    (msvd / "youtube_mapping.txt").write_text(mapping, encoding="utf-8")  # no final newline, as the real file
    question_id = 0
    for name, split in (("train", "train"), ("val", "validate"), ("test", "test")):
        lines, items = [], []
        for video in (v for v in videos if v["split"] == split):
            for qa in demo_questions(video):
                lines.append(json.dumps({"answer": qa["answer"], "question": qa["question"],
                                         "video_id": video["video_id"], "answer_type": qa["answer_type"]}))
                items.append({"answer": qa["answer"], "id": question_id, "question": qa["question"],
                              "video_id": vid_numbers[video["video_id"]]})
                question_id += 1
        (msrvtt / f"{name}.jsonl").write_text("\n".join(lines), encoding="utf-8")  # no final newline, as ClipBERT's
        (msvd / f"{name}_qa.json").write_text(json.dumps(items, separators=(",", ":")), encoding="utf-8")
        if name == "train":
            answers = sorted({json.loads(line)["answer"] for line in lines})
            ans2label = json.dumps({answer: label for label, answer in enumerate(answers)})
            (msrvtt / "train_ans2label.json").write_text(ans2label, encoding="utf-8")
            (msvd / "train_ans2label.json").write_text(ans2label, encoding="utf-8")


def _with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _write_video(path: Path, video: dict, rng: np.random.Generator, size: int, fps: int, seconds: int) -> None:
    n_frames = fps * seconds
    radius = 0.2 * size
    travel = 0.4 * size
    (dx, dy), _ = DIRECTIONS[video["direction"]]
    # Start so that the whole path stays inside the frame, with a random offset across the motion.
    across = rng.uniform(0.35, 0.65) * size
    start_x = 0.5 * size - dx * travel / 2 if dx else across
    start_y = 0.5 * size - dy * travel / 2 if dy else across
    background = int(rng.integers(30, 70))
    bgr = tuple(reversed(COLOURS[video["colour"]]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4v video {path}")
    for frame_index in range(n_frames):
        progress = frame_index / max(n_frames - 1, 1)
        centre = (start_x + dx * travel * progress, start_y + dy * travel * progress)
        frame = np.full((size, size, 3), background, dtype=np.uint8)
        _draw_trail(frame, centre, (dx, dy), radius, bgr, background)
        _draw_shape(frame, video["shape"], centre, radius, bgr)
        writer.write(frame)
    writer.release()


def _draw_trail(frame: np.ndarray, centre: tuple[float, float], direction: tuple[int, int], radius: float,
                bgr: tuple, background: int) -> None:
    """Fading dots behind the shape, so that one frame shows which way it moves (as motion blur would): the
    model's frame features are an unordered set, so without it the direction is only in the frame order."""
    for distance, strength in ((2.9, 0.3), (2.2, 0.45), (1.5, 0.6)):
        x = centre[0] - direction[0] * distance * radius
        y = centre[1] - direction[1] * distance * radius
        colour = tuple(round(background + strength * (channel - background)) for channel in bgr)
        cv2.circle(frame, (round(x), round(y)), max(1, round(0.5 * radius)), colour, thickness=-1,
                   lineType=cv2.LINE_AA)


def _draw_shape(frame: np.ndarray, shape: str, centre: tuple[float, float], radius: float, bgr: tuple) -> None:
    x, y = centre
    r = radius
    if shape == "circle":
        cv2.circle(frame, (round(x), round(y)), round(r), bgr, thickness=-1, lineType=cv2.LINE_AA)
        return
    if shape == "square":
        points = [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    elif shape == "triangle":
        points = [(x, y - r), (x + r, y + r), (x - r, y + r)]
    elif shape == "diamond":
        points = [(x, y - 1.2 * r), (x + r, y), (x, y + 1.2 * r), (x - r, y)]
    elif shape == "cross":
        t = r / 3
        points = [(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t), (x + t, y + t),
                  (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t), (x - r, y - t), (x - t, y - t)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    polygon = np.round(np.array(points)).astype(np.int32)
    cv2.fillPoly(frame, [polygon], bgr, lineType=cv2.LINE_AA)


def _check_decodes(path: Path, n_frames: int) -> None:
    decoded = read_frames(path, feature_framerate=0)
    if len(decoded) != n_frames:
        raise RuntimeError(f"{path}: wrote {n_frames} frames but decoded {len(decoded)}")


def _write_msrvtt_annotations(paths: dict[str, Path], videos: list[dict], rng: np.random.Generator,
                              seconds: int) -> None:
    data = {
        "info": {"year": "2016", "version": "1.0", "description": "Synthetic T2VLP demo data in the MSR-VTT layout.",
                 "contributor": "t2vlp dataloaders.demo_data", "data_created": "2016-04-14 14:30:20"},
        "videos": [
            {"category": SHAPES.index(video["shape"]), "url": f"https://www.youtube.com/watch?v=demo{number:07d}",
             "video_id": video["video_id"], "start time": 0.0, "end time": float(seconds),
             "split": video["split"], "id": number}
            for number, video in enumerate(videos)
        ],
        "sentences": _shuffled_sentences(videos, rng),
    }
    paths["data_json"].write_text(json.dumps(data))
    with paths["train_csv"].open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["video_id"])
        writer.writerows([video["video_id"]] for video in videos if video["split"] == "train")
    with paths["test_csv"].open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        test_videos = [video for video in videos if video["split"] == "test"]
        for position, video in enumerate(test_videos):
            number = video["video_id"].removeprefix("video")
            caption = video["captions"][rng.integers(len(video["captions"]))]
            writer.writerow([f"ret{position}", f"msr{number}", video["video_id"], caption])


def _shuffled_sentences(videos: list[dict], rng: np.random.Generator) -> list[dict]:
    """Sentences in random order, as in the real file (not grouped by video); sen_id follows the final order."""
    pairs = [(video["video_id"], caption) for video in videos for caption in video["captions"]]
    order = rng.permutation(len(pairs))
    return [{"caption": pairs[i][1], "video_id": pairs[i][0], "sen_id": sen_id} for sen_id, i in enumerate(order)]


def _webvid_location(number: int) -> tuple[str, int, str]:
    """(videoid, page_idx, page_dir) of the `number`-th row of the demo's WebVid csv."""
    page_idx = number // 2 + 1
    first_page = (page_idx - 1) // 50 * 50 + 1
    return str(WEBVID_FIRST_ID + number), page_idx, f"{first_page:06d}_{first_page + 49:06d}"


def _webvid_file(paths: dict[str, Path], number: int) -> Path:
    videoid, _, page_dir = _webvid_location(number)
    return paths["webvid_videos_dir"] / page_dir / f"{videoid}.mp4"


def _write_webvid(paths: dict[str, Path], train_videos: list[dict], seconds: int) -> None:
    """WebVid's `results_2M_train.csv` (one caption per video) and `videos/<page_dir>/<videoid>.mp4`: MSR-VTT
    training videos are linked from the MSR-VTT folder; WebVid-only ones are already in place."""
    paths["webvid_dir"].mkdir(parents=True, exist_ok=True)
    with paths["webvid_csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        for number, video in enumerate(train_videos):
            videoid, page_idx, page_dir = _webvid_location(number)
            # One of the video's captions in WebVid's sentence case; a comma forces csv quoting.
            caption = video["captions"][number % len(video["captions"])]
            name = f"{caption[0].upper()}{caption[1:]}, in a video clip."
            slug = name.lower().replace(",", "").replace(".", "").replace(" ", "-")
            url = f"https://ak.picdn.net/shutterstock/videos/{videoid}/preview/stock-footage-{slug}.mp4"
            writer.writerow([videoid, name, page_idx, page_dir, f"PT00H00M{seconds:02d}S", url])
            if "path" not in video:
                _link_or_copy(paths["videos_dir"] / f"{video['video_id']}.mp4", _webvid_file(paths, number))


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_data", help="output folder (default: demo_data)")
    parser.add_argument("--n_train", type=int, default=400)
    parser.add_argument("--n_test", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--n_val", type=int, default=20)
    parser.add_argument("--n_webvid_only", type=int, default=DEMO_WEBVID_ONLY,
                        help="pre-training videos found only in the WebVid-style set")
    args = parser.parse_args()
    if min(args.n_train, args.n_test, args.n_val, args.n_webvid_only) < 0:
        parser.error("video counts cannot be negative")
    paths = make_demo_dataset(args.out, args.n_train, args.n_test, args.seed, args.size, args.fps, args.seconds,
                              args.n_val, args.n_webvid_only)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
