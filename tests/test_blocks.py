"""Block mode (dataloaders/blocks.py, engine/sampler.BlockSampler) on moto's S3 server: one ranged GET a block,
every sample once an epoch over 2 ranks, an exact resume, a damaged record skipped alone; and the blocks of a
catalogue whose labels do not follow its shards."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from torch.utils.data import DataLoader

from dataloaders.blocks import block_layout
from dataloaders.catalogue import ensure_catalogue
from dataloaders.clip_store import encode_image_clip_record
from dataloaders.collate import collate_clips
from dataloaders.tfrecord_io import s3_client, write_record
from dataloaders.webvid import WebVidDataset
from engine.sampler import BlockSampler
from engine.trainer import TrainSettings, check_block_resume
from modules.errors import InputError
from tests.test_webvid_s3 import recorded_gets, s3_env, s3_server, upload  # noqa: F401 (fixtures)

SHARD_SIZES = (15, 15, 10)  # 40 clips
K, BUFFER = 4, 2


def write_store(folder, corrupt: str | None = None, labels_order=None) -> list[str]:
    """Three shards of small records (two 8x8 JPEG frames each, coloured by clip), the index and the labels in the
    converter's layout; `corrupt`: the id whose record gets one payload byte flipped."""
    folder.mkdir(parents=True, exist_ok=True)
    ids, lines = [], []
    for shard, size in enumerate(SHARD_SIZES):
        name = f"path-{shard:05d}.tfrecord"
        with open(folder / name, "wb") as stream:
            offset = 0
            for k in range(size):
                clip_id = f"{shard}-{k:02d}"
                frame = np.full((8, 8, 3), 6 * len(ids), np.uint8)
                jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
                framed = write_record(stream, encode_image_clip_record(clip_id, [jpeg, jpeg], 8, 8, [0, 1]))
                if clip_id == corrupt:
                    stream.seek(offset + 40)
                    stream.write(b"\x00\xff\x00")
                    stream.seek(0, 2)
                lines.append(f"{clip_id}\t{name}\t{offset}\n")
                ids.append(clip_id)
                offset += framed
    (folder / "path.index").write_text("".join(lines))
    ordered = ids if labels_order is None else [ids[i] for i in labels_order]
    (folder / "frozen_train_labels.json").write_text(
        "[\n" + ",\n".join(json.dumps({"video_id": i, "caption": f"clip {i}"}) for i in ordered) + "\n]\n")
    return ordered


def dataset_of(url: str, **options) -> WebVidDataset:
    catalogue = ensure_catalogue(f"{url}/frozen_train_labels.json", url)
    return WebVidDataset(f"{url}/frozen_train_labels.json", url, max_words=8, max_frames=2, image_size=8,
                         catalogue=catalogue, blocks=block_layout(catalogue, K), block_buffer=BUFFER, **options)


def epoch(dataset: WebVidDataset, rank: int, workers: int = 0, skip: int = 0, epoch_number: int = 1) -> list[int]:
    sampler = BlockSampler(dataset.block_layout, 2, rank, seed=5, buffer_blocks=BUFFER, num_workers=workers,
                           batch_size=3)
    sampler.set_epoch(epoch_number)
    sampler.skip(skip)
    loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=workers, collate_fn=collate_clips)
    return [i for batch in loader for i in batch["index"].tolist()]


def test_one_get_a_block_and_every_sample_once_an_epoch_over_two_ranks(s3_env, tmp_path):  # noqa: F811
    ids = write_store(tmp_path / "store")
    url = upload(s3_env, tmp_path / "store", "blocks")
    datasets = [dataset_of(url), dataset_of(url)]  # one per rank
    layout = datasets[0].block_layout
    assert layout.n_blocks == 4 + 4 + 3 and layout.order is None  # 15, 15, 10 records by 4
    seen = []
    with recorded_gets(s3_client()) as gets:
        for rank in (0, 1):
            seen.append(epoch(datasets[rank], rank))
    assert sorted(seen[0] + seen[1]) == list(range(len(ids)))  # 40 samples, 20 each, none twice
    assert all(r.startswith("bytes=") for r in gets)
    assert len(gets) <= layout.n_blocks + len(SHARD_SIZES) and len(gets) < len(ids) / 2
    assert sum(d._blocks.n_fetched for d in datasets) == len(gets)
    assert sum(d.n_skipped for d in datasets) == 0
    again = [epoch(dataset_of(url), 0, epoch_number=2), epoch(dataset_of(url), 1, epoch_number=2)]
    assert sorted(again[0] + again[1]) == list(range(len(ids))) and again[0] != seen[0]  # another order


def test_default_mode_is_one_get_a_clip(s3_env, tmp_path):  # noqa: F811
    ids = write_store(tmp_path / "store")
    url = upload(s3_env, tmp_path / "store", "per_clip")
    dataset = WebVidDataset(f"{url}/frozen_train_labels.json", url, max_words=8, max_frames=2, image_size=8)
    with recorded_gets(s3_client()) as gets:
        assert all(dataset[i] is not None for i in range(len(ids)))
    assert len(gets) >= len(ids)


def test_resume_in_the_middle_of_an_epoch_continues_the_same_order(s3_env, tmp_path):  # noqa: F811
    write_store(tmp_path / "store")
    url = upload(s3_env, tmp_path / "store", "resume")
    whole = [epoch(dataset_of(url), rank, workers=2) for rank in (0, 1)]
    consumed = 2 * 3 * 2  # two batches of 3 on each of 2 ranks
    resumed = [epoch(dataset_of(url), rank, workers=2, skip=consumed) for rank in (0, 1)]
    assert resumed == [whole[0][6:], whole[1][6:]]
    assert sorted(whole[0] + whole[1]) == list(range(40))


def test_a_damaged_record_is_skipped_alone_and_counted(s3_env, tmp_path):  # noqa: F811
    write_store(tmp_path / "store", corrupt="1-05")
    url = upload(s3_env, tmp_path / "store", "corrupt")
    dataset = dataset_of(url, verify_crc=True)
    read = epoch(dataset, 0) + epoch(dataset, 1)
    assert sorted(read) == sorted(set(range(40)) - {15 + 5})
    assert dataset.n_skipped == 1


def test_blocks_of_labels_in_another_order_than_the_shards(tmp_path):
    order = list(np.random.default_rng(3).permutation(40))
    labels = write_store(tmp_path / "store", labels_order=order + [order[0]])  # one clip twice, as captions are
    index = tmp_path / "store"
    text = (index / "path.index").read_text()
    (index / "path.index").write_text(text + "not-labelled\tpath-00000.tfrecord\t0\n")
    items = json.loads((index / "frozen_train_labels.json").read_text()) + [{"video_id": "gone", "caption": "x"}]
    (index / "frozen_train_labels.json").write_text(json.dumps(items))
    catalogue = ensure_catalogue(index / "frozen_train_labels.json", index)
    layout = block_layout(catalogue, K)
    assert layout.order is not None and layout.n_samples == 41  # the label without a record has no position
    rows = layout.rows(np.arange(layout.n_samples))
    keys = [(catalogue.location(r)[0], catalogue.location(r)[1]) for r in rows]
    assert keys == sorted(keys) and sorted(rows.tolist()) == list(range(41))
    for block in range(layout.n_blocks):  # every block: one shard, its records inside its byte range
        members = rows[layout.starts[block]:layout.starts[block + 1]]
        assert 1 <= len(members) <= K and {catalogue.location(r)[0] for r in members} == {layout.shards[block]}
        for row in members:
            assert layout.begins[block] <= catalogue.location(row)[1]
            assert layout.ends[block] < 0 or catalogue.location(row)[1] < layout.ends[block]
            assert layout.block_of(*catalogue.location(row)[:2]) in (block, block + 1)
    assert labels[40] == labels[0]
    dataset = WebVidDataset(index / "frozen_train_labels.json", index, max_words=8, max_frames=2, image_size=8,
                            catalogue=catalogue, blocks=layout, block_buffer=BUFFER)
    sampler = BlockSampler(layout, 1, 0, seed=1, buffer_blocks=BUFFER)
    read = [dataset[row]["video_id"] for row in sampler]
    assert sorted(read) == sorted(labels)


def test_a_mid_epoch_resume_in_block_mode_needs_the_same_processes_and_workers():
    settings = TrainSettings(epochs=1, micro_batch_size=2, accumulation_steps=1, lr=1e-3, coef_lr=1, new_params_lr=1,
                             weight_decay=0, warmup_proportion=0, num_workers=2)
    check_block_resume({"world_size": 4, "settings": {"num_workers": 2}}, settings, 4)
    for state, world in (({"world_size": 4, "settings": {"num_workers": 2}}, 2),
                         ({"world_size": 4, "settings": {"num_workers": 4}}, 4)):
        with pytest.raises(InputError, match="block mode: this run stopped in the middle of an epoch"):
            check_block_resume(state, settings, world)


def test_stage1_trains_and_resumes_in_block_mode(webvid_demo, tiny_clip_checkpoint, tmp_path, caplog, capsys):
    import main_task_clip
    from tests.test_hostile_inputs import stage1_on

    store = webvid_demo["tfrecord_dir"]
    argv = stage1_on(store, webvid_demo, tiny_clip_checkpoint, tmp_path / "run", "--block_records=8",
                     "--block_buffer=2", "--num_thread_reader=2")
    with caplog.at_level("INFO"):
        assert main_task_clip.main(argv) == 0
        assert "block mode: 64 samples in 8 blocks of up to 8 records" in caplog.text
        assert main_task_clip.main([*argv, "--max_steps=3", "--num_thread_reader=1"]) == 2  # other workers
        assert "block mode: this run stopped in the middle of an epoch" in capsys.readouterr().err
        assert main_task_clip.main([*argv, "--max_steps=3"]) == 0  # resumed in the middle of the epoch
    assert "resumed from restore.bin: epoch 0, 8 samples into the epoch, step 1" in caplog.text
    assert "step 3/8" in caplog.text


@pytest.mark.parametrize("written_by", ["converter", "derived"])
def test_a_catalogue_in_shard_order_is_cut_as_a_stream_into_the_blocks_sorting_gives(webvid_demo, tmp_path,
                                                                                      written_by):
    from dataloaders.blocks import _sorted_layout
    from dataloaders.catalogue import Catalogue, beside_path, build_catalogue

    store = webvid_demo["tfrecord_dir"]
    labels = store / "frozen_train_labels.json"
    if written_by == "converter":
        catalogue = Catalogue(beside_path(str(labels)))
    else:
        catalogue = build_catalogue(str(labels), str(store), tmp_path / "derived.catalogue.arrow")
    known = {catalogue.location(r)[2] >= 0 for r in range(len(catalogue))}
    assert known == ({True} if written_by == "converter" else {False})
    for k in (1, 3, 7, 64):
        streamed, in_memory = block_layout(catalogue, k), _sorted_layout(catalogue, k)
        assert streamed.order is None and np.array_equal(in_memory.order, np.arange(len(catalogue)))
        for field in ("starts", "shards", "begins", "ends"):
            assert np.array_equal(getattr(streamed, field), getattr(in_memory, field)), (k, field)
        following = streamed.shards[1:] == streamed.shards[:-1]  # a block ends where the next of its shard begins
        assert np.array_equal(streamed.ends[:-1][following], streamed.begins[1:][following])
        if written_by == "derived":  # the last record of a shard: read to the shard's end
            assert np.all(streamed.ends[:-1][~following] == -1) and streamed.ends[-1] == -1
        else:  # the converter knows every record's length: a shard's last block ends at the shard's size
            sizes = {p.name: p.stat().st_size for p in store.glob("*.tfrecord")}
            ends = streamed.ends[np.append(~following, True)]
            assert ends.tolist() == [sizes[catalogue.shards[s]] for s in streamed.shards[np.append(~following, True)]]


def test_a_store_on_s3_without_its_labels_is_a_missing_file(s3_env, tmp_path):  # noqa: F811
    write_store(tmp_path / "store")
    url = upload(s3_env, tmp_path / "store", "nolabels")
    s3_env.delete_object(Bucket="webvid", Key="nolabels/frozen_train_labels.json")
    with pytest.raises(FileNotFoundError, match="nolabels/frozen_train_labels.json"):
        ensure_catalogue(f"{url}/frozen_train_labels.json", url)
