"""A searchable index of a folder of videos (predict.py index / query).

An index is a folder of plain files other tools can read:
* `index.json`: the checkpoint and sampling settings it was built with, one entry per indexed video (`path`,
  `size`, `mtime`, in row order), the videos that could not be read, and what the last update did;
* `clip_features.npy` [N, D] float32: each video's meanP feature (unit norm), what text queries are scored against;
* `frames.npy` [N, T, D] float16 and `video_mask.npy` [N, T] uint8: frame features, and `tubes.npy` [N, K, D]
  float16 when the model has a fusion encoder: the inputs of the fusion rerank.

Re-indexing encodes only new or changed files (by size and modification time) and drops deleted ones. Search is
exact: one matrix product per chunk of rows, read memory-mapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataloaders.collate import collate_clips, is_empty_batch
from dataloaders.files import FolderLock, file_sha256, is_video_file, walk_files
from dataloaders.video import ClipSampling, load_video_clip, normalize_video
from dataloaders.video_decoding import VideoDecodeError
from engine.evaluation.rerank import rerank_scores
from engine.precision import autocast_context
from inference.trained_model import TrainedModel
from modules.errors import InputError
from modules.similarity import mean_pool_frames

logger = logging.getLogger("t2vlp.predict")

INDEX_FORMAT = 1
ARRAYS = ("clip_features", "frames", "video_mask", "tubes")
SEARCH_CHUNK = 1 << 18  # rows scored per matrix product


def find_videos(folder: Path) -> list[Path]:
    """Every file with a video extension under `folder` (recursively, following links), sorted."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of videos")
    return sorted(Path(os.path.abspath(path)) for path in walk_files(folder, is_video_file))  # links not resolved


# The model settings an index records, with which its videos were encoded: its queries must use the same.
INDEX_SETTINGS = ("fusion_layers", "match_norm", "max_frames", "feature_framerate", "slice_framepos", "max_words")


def sampling_settings(trained: TrainedModel) -> dict[str, Any]:
    settings = trained.settings
    return {"max_frames": settings["max_frames"], "feature_framerate": settings["feature_framerate"],
            "slice_framepos": settings["slice_framepos"], "image_size": trained.model.image_resolution}


class VideoFiles(Dataset):
    """Decoded clips of a list of files with the retrieval sampling flags; None (counted) when unreadable."""

    def __init__(self, paths: list[Path], sampling: dict[str, Any]) -> None:
        self.paths, self.sampling = paths, sampling
        self.errors: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            video, video_mask = load_video_clip(self.paths[index], ClipSampling(pad_mode="repeat", **self.sampling))
        except (VideoDecodeError, OSError, ValueError) as error:
            return {"failed": index, "error": str(error)}
        return {"video": video, "video_mask": video_mask, "index": index, "video_id": str(self.paths[index])}


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [(item["failed"], item["error"]) for item in batch if "failed" in item]
    collated = collate_clips([None if "failed" in item else item for item in batch])
    collated["failed"] = failed
    return collated


@torch.no_grad()
def encode_videos(trained: TrainedModel, paths: list[Path], *, batch_size: int, num_workers: int,
                  device: torch.device, precision: str) -> tuple[dict[str, np.ndarray], list[int], dict[int, str]]:
    """Arrays of the decodable videos among `paths` whose features are finite (in order), their positions in
    `paths`, and the errors of the others; a model whose features are non-finite for every video is refused."""
    dataset = VideoFiles(paths, sampling_settings(trained))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        generator=torch.Generator().manual_seed(0))
    model = trained.model
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
    rows: list[int] = []
    errors: dict[int, str] = {}
    non_finite = 0
    for batch in tqdm(loader, desc="indexing videos", unit="batch"):
        errors.update(dict(batch["failed"]))
        if is_empty_batch(batch):
            continue
        video = normalize_video(batch["video"].to(device))
        video_mask = batch["video_mask"].to(device)
        with autocast_context(device, precision):
            frames, tubes = model.encode_video(video, video_mask)
        features = mean_pool_frames(frames, video_mask).float()
        finite = (torch.isfinite(features).all(dim=-1) & torch.isfinite(frames).flatten(1).all(dim=-1)
                  & torch.isfinite(tubes).flatten(1).all(dim=-1)).cpu()
        for position in (~finite).nonzero().flatten().tolist():
            errors[int(batch["index"][position])] = "the model gives non-finite features for this video"
        keep = finite.nonzero().flatten()
        parts["clip_features"].append(features.cpu()[keep].numpy().astype(np.float32))
        parts["frames"].append(frames.cpu()[keep].numpy().astype(np.float16))
        parts["video_mask"].append(video_mask.cpu()[keep].numpy().astype(np.uint8))
        parts["tubes"].append(tubes.cpu()[keep].numpy().astype(np.float16))
        rows += [int(batch["index"][position]) for position in keep.tolist()]
        non_finite += int((~finite).sum())
    if non_finite and not rows:
        raise InputError(f"{trained.checkpoint} gives non-finite features for every video ({non_finite}): the "
                         f"checkpoint is damaged")
    arrays = {name: np.concatenate(values) for name, values in parts.items() if values}
    return arrays, rows, errors


SWAP_LOCK = ".index.swap.lock"  # held shared by readers while they open a version, exclusively for the swap


@contextlib.contextmanager
def swap_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """Readers (shared) open index.json and every array under it; the writer (exclusive) replaces them all under
    it: a reader sees one version, whole (its memory maps keep the files it opened after they are replaced). A
    folder the reader cannot write to is read without it."""
    try:
        handle = open(folder / SWAP_LOCK, "a+b")  # noqa: SIM115 - held for the with block
    except OSError:
        if exclusive:
            raise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@dataclass
class VideoIndex:
    folder: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # opened (memory-mapped) with index.json

    @classmethod
    def load(cls, folder: str | Path, check_arrays: bool = True) -> VideoIndex:
        """The index in `folder`, its arrays checked against index.json (InputError naming what is wrong);
        index.json and the arrays are opened together, as one version even while `predict.py index` updates it."""
        folder = Path(folder)
        path = folder / "index.json"
        if not path.is_file():
            raise InputError(f"{folder} is not an index (no index.json): build one with `predict.py index`")
        with swap_lock(folder, exclusive=False):
            return cls._load(folder, path, check_arrays)

    @classmethod
    def _load(cls, folder: Path, path: Path, check_arrays: bool) -> VideoIndex:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{path} is damaged (not JSON: {error}); delete {folder} and build it again with "
                             f"`predict.py index`") from error
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise InputError(f"{path}: index format {found} is not {INDEX_FORMAT}; rebuild it")
        index = cls(folder, meta, _open_arrays(folder))
        problem = index.inconsistency() if check_arrays else None
        if problem:
            raise InputError(f"{folder}: {problem}; run `predict.py index` on its folder again to repair it")
        return index

    def inconsistency(self) -> str | None:
        """What in index.json or the arrays is not as an index writes it (entries that are not objects with a
        path, settings that are not an object, a missing, unreadable, short or misshapen array), or None."""
        videos, settings = self.meta.get("videos"), self.meta.get("settings")
        if not isinstance(settings, dict) or "checkpoint" not in settings:
            return "index.json has no settings object naming its checkpoint"
        if not isinstance(videos, list) or not all(isinstance(entry, dict) and isinstance(entry.get("path"), str)
                                                   for entry in videos):
            return "index.json's videos are not a list of objects with a path"
        count = len(videos)
        shapes: dict[str, tuple[int, ...]] = {}
        for name in ARRAYS:
            opened = self.arrays.get(name)
            if opened is None:
                if name == "clip_features" and count:
                    return f"{name}.npy is missing"
                continue
            if isinstance(opened, str):
                return f"{name}.npy cannot be read ({opened})"
            shapes[name] = opened.shape
            if shapes[name][0] != count:
                return f"{name}.npy has {shapes[name][0]} rows for the {count} videos of index.json"
        if "clip_features" in shapes and len(shapes["clip_features"]) != 2:
            return f"clip_features.npy is {len(shapes['clip_features'])}-D, not [videos, dimension]"
        return None

    @property
    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.meta["videos"]]

    def array(self, name: str) -> np.ndarray:
        opened = self.arrays.get(name)
        if not isinstance(opened, np.ndarray):
            raise InputError(f"{self.folder} has no {name}.npy (built from a model without a fusion encoder?)")
        return opened


def _open_arrays(folder: Path) -> dict[str, np.ndarray | str]:
    """Every array of the index, memory-mapped, or the reason it cannot be read; absent ones left out."""
    opened: dict[str, np.ndarray | str] = {}
    for name in ARRAYS:
        path = folder / f"{name}.npy"
        if path.is_file():
            try:
                opened[name] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                opened[name] = str(error)
    return opened


def _stat(path: Path) -> dict[str, Any]:
    status = path.stat()
    return {"path": str(path), "size": status.st_size, "mtime": status.st_mtime_ns}


def checkpoint_identity(path: Path, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a checkpoint's contents: its path, size, mtime and SHA-256. The hash of `known` (an identity
    recorded earlier) is reused when size and mtime are unchanged, so an unchanged checkpoint is not read again."""
    status = path.stat()
    identity = {"path": str(path.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}
    if known and all(known.get(key) == identity[key] for key in ("size", "mtime_ns")) and known.get("sha256"):
        return {**identity, "sha256": known["sha256"]}
    return {**identity, "sha256": file_sha256(path)}


def same_checkpoint(recorded: dict[str, Any] | None, path: Path) -> bool:
    """Whether `path` holds the checkpoint `recorded` identifies (same contents, wherever it lies now)."""
    if not recorded:
        return False
    status = path.stat()
    if status.st_size != recorded.get("size"):
        return False
    return checkpoint_identity(path, recorded)["sha256"] == recorded.get("sha256")


def update_index(trained: TrainedModel, video_dir: str | Path, out: str | Path, *, batch_size: int = 16,
                 num_workers: int = 0, device: torch.device, precision: str) -> dict[str, Any]:
    """Build or update the index of `video_dir` in `out`, holding `out` against other writers; returns what this
    update did. Everything is encoded again when the settings or the checkpoint's contents changed, or when the
    arrays do not match index.json."""
    out = Path(out)
    with FolderLock(out, what="the index folder"):
        return _update_index(trained, Path(video_dir), out, batch_size=batch_size, num_workers=num_workers,
                             device=device, precision=precision)


def _update_index(trained: TrainedModel, video_dir: Path, out: Path, *, batch_size: int, num_workers: int,
                  device: torch.device, precision: str) -> dict[str, Any]:
    files = find_videos(video_dir)
    previous = _previous_index(out)
    known = previous.meta["settings"].get("checkpoint_identity") if previous is not None else None
    identity = checkpoint_identity(trained.checkpoint, known)
    settings = {"checkpoint": str(trained.checkpoint.resolve()), **sampling_settings(trained),
                **{name: trained.settings[name] for name in INDEX_SETTINGS},
                "checkpoint_identity": identity}
    old_meta, old_arrays = None, {}
    if previous is not None:
        if previous.meta["settings"] == settings:
            old_meta = previous.meta
            old_arrays = {name: previous.array(name) for name in ARRAYS if name in previous.arrays}
        else:
            logger.warning("%s was built with other settings or another checkpoint (or the checkpoint changed): "
                           "re-encoding everything", out)
    old_rows = {entry["path"]: (row, entry) for row, entry in enumerate(old_meta["videos"])} if old_meta else {}
    stats = {path: _stat(path) for path in files}
    reused = [path for path in files if str(path) in old_rows and old_rows[str(path)][1] == stats[path]]
    reused_set = set(reused)
    to_encode = [path for path in files if path not in reused_set]
    removed = sorted(set(old_rows) - {str(path) for path in files})
    new_arrays, encoded_rows, errors = (encode_videos(trained, to_encode, batch_size=batch_size,
                                                      num_workers=num_workers, device=device, precision=precision)
                                        if to_encode else ({}, [], {}))
    new_row = {to_encode[i]: row for row, i in enumerate(encoded_rows)}  # file -> row of new_arrays
    kept = [path for path in files if path in reused_set or path in new_row]  # sorted order; unreadable left out
    entries = [stats[path] for path in kept]
    from_old = [position for position, path in enumerate(kept) if path in reused_set]
    from_new = [position for position, path in enumerate(kept) if path not in reused_set]
    arrays = {}
    for name in ARRAYS:  # one gather per source: rows of a memory-mapped old index are read in a single pass
        parts = [(old_arrays.get(name), from_old, [old_rows[str(kept[p])][0] for p in from_old]),
                 (new_arrays.get(name), from_new, [new_row[kept[p]] for p in from_new])]
        parts = [(array, positions, rows) for array, positions, rows in parts if array is not None and rows]
        if not parts:
            continue
        template = parts[0][0]
        arrays[name] = np.empty((len(kept), *template.shape[1:]), dtype=template.dtype)
        for array, positions, rows in parts:
            arrays[name][positions] = array[rows]
    failed = [{"path": str(to_encode[i]), "error": error} for i, error in sorted(errors.items())]
    update = {"encoded": [str(to_encode[i]) for i in encoded_rows], "reused": len(reused), "removed": removed,
              "failed": failed}
    _write_index(out, settings, entries, arrays, update)
    return update


def _previous_index(out: Path) -> VideoIndex | None:
    """The index already in `out`, or None (none yet, or one whose arrays are damaged: it is rebuilt)."""
    if not (out / "index.json").is_file():
        return None
    index = VideoIndex.load(out, check_arrays=False)
    problem = index.inconsistency()
    if problem:
        logger.warning("%s: %s: re-encoding everything", out, problem)
        return None
    return index


def _write_index(out: Path, settings: dict[str, Any], entries: list[dict], arrays: dict[str, np.ndarray],
                 update: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    written = []  # (temporary, final name); one writer: the folder is locked
    for name in ARRAYS:
        if name in arrays:
            temporary = out / f".{name}.npy.tmp"
            with open(temporary, "wb") as handle:
                np.save(handle, arrays[name])
            written.append((temporary, out / f"{name}.npy"))
    meta = {"format": INDEX_FORMAT, "settings": settings, "videos": entries, "last_update": update}
    temporary = out / ".index.json.tmp"
    temporary.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    written.append((temporary, out / "index.json"))
    with swap_lock(out, exclusive=True):  # readers see the old version or this one, whole
        for name in ARRAYS:
            if name not in arrays:
                (out / f"{name}.npy").unlink(missing_ok=True)
        for source, target in written:
            os.replace(source, target)


@dataclass
class Hit:
    path: str
    score: float
    row: int


@torch.no_grad()
def search(trained: TrainedModel, index: VideoIndex, text: str, *, top_k: int = 10, rerank: bool = False,
           rerank_top_k: int = 32, device: torch.device, precision: str) -> list[Hit]:
    """The `top_k` videos of the index for `text`: meanP scores (exp(logit_scale) · cosine), or with `rerank`
    the fusion rerank of the best `max(top_k, rerank_top_k)` (scores above 1000, docs/method.md §7a)."""
    from modules.tokenization import ClipTokenizer

    if not index.paths:
        return []
    model = trained.model
    ids, mask = ClipTokenizer().encode(text, trained.settings["max_words"])
    input_ids, attention_mask = torch.tensor([ids], device=device), torch.tensor([mask], device=device)
    with autocast_context(device, precision):
        eot, tokens = model.encode_text(input_ids, attention_mask)
    query = torch.nn.functional.normalize(eot.float(), dim=-1)[0] * model.clip.logit_scale.float().exp()
    if not torch.isfinite(query).all():
        raise InputError(f"{trained.checkpoint} gives a non-finite text feature: the checkpoint is damaged")
    features = index.array("clip_features")
    if features.shape[1] != query.shape[0]:
        raise InputError(f"{index.folder}: clip_features.npy holds {features.shape[1]}-wide features, the model's are "
                         f"{query.shape[0]} wide; rebuild the index with this model")
    keep = max(top_k, rerank_top_k if rerank else 0)
    best_scores, best_rows = top_rows(features, query, keep)
    ranked = torch.isfinite(best_scores)  # a row of non-finite features (a damaged array) is never a hit
    best_scores, best_rows = best_scores[ranked], best_rows[ranked]
    if rerank:
        trained.require_fusion("--rerank")
        best_scores = _rerank(trained, index, best_rows, best_scores, tokens, attention_mask, device, precision)
        order = best_scores.argsort(descending=True)
        best_scores, best_rows = best_scores[order], best_rows[order]
    paths = index.paths
    return [Hit(paths[int(row)], float(score), int(row)) for score, row in zip(best_scores[:top_k],
                                                                               best_rows[:top_k])]


def top_rows(features: np.ndarray, query: torch.Tensor, keep: int,
             chunk_rows: int = SEARCH_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-`keep` (scores, rows) of `features` [N, D] (e.g. memory-mapped) · `query` [D], a chunk of rows at a
    time so that N is limited by the disk, not by memory."""
    best_scores = torch.empty(0)
    best_rows = torch.empty(0, dtype=torch.long)
    for start in range(0, features.shape[0], chunk_rows):
        chunk = torch.from_numpy(np.array(features[start : start + chunk_rows], dtype=np.float32)).to(query.device)
        scores = torch.cat([best_scores, (chunk @ query.float()).nan_to_num(nan=-math.inf).cpu()])  # never a NaN
        rows = torch.cat([best_rows, torch.arange(start, start + len(chunk))])
        order = scores.topk(min(keep, len(scores))).indices
        best_scores, best_rows = scores[order], rows[order]
    return best_scores, best_rows


def _rerank(trained, index, rows, scores, tokens, attention_mask, device, precision) -> torch.Tensor:
    model = trained.model
    def rows_of(name: str, dtype) -> torch.Tensor:
        return torch.from_numpy(np.array(index.array(name)[rows.numpy()], dtype=dtype)).to(device)

    frames, video_mask, tubes = rows_of("frames", np.float32), rows_of("video_mask", np.int64), rows_of("tubes",
                                                                                                       np.float32)

    def match_probability(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        flat = candidates.reshape(-1).to(device)
        count = flat.shape[0]
        with autocast_context(device, precision):
            logits = model.match_logits(frames[flat], video_mask[flat], tubes[flat],
                                        tokens.expand(count, -1, -1), attention_mask.expand(count, -1),
                                        group_size=candidates.shape[1])
        return torch.softmax(logits.float(), dim=-1)[:, 1].reshape(candidates.shape).cpu()

    return rerank_scores(scores[None].double(), len(rows), match_probability)[0].float()
