from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

from engine.sampler import ResumableDistributedSampler, eval_shard


def shards(n, replicas, **kwargs):
    samplers = [ResumableDistributedSampler(n, replicas, rank, **kwargs) for rank in range(replicas)]
    return samplers, [list(s) for s in samplers]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_same_split_as_torch_distributed_sampler(shuffle, drop_last):
    for rank in range(3):
        ours = ResumableDistributedSampler(10, 3, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
        theirs = DistributedSampler(list(range(10)), 3, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
        ours.set_epoch(4)
        theirs.set_epoch(4)
        assert list(ours) == list(theirs)
        assert len(ours) == len(theirs)


def test_drop_last_sees_every_sample_at_most_once():
    samplers, parts = shards(23, 4, seed=1, drop_last=True)
    counts = Counter(i for part in parts for i in part)
    assert [len(p) for p in parts] == [5, 5, 5, 5]
    assert len(counts) == 20 and max(counts.values()) == 1
    assert samplers[0].num_samples == 5


def test_padding_covers_every_sample():
    _, parts = shards(10, 4, seed=1, drop_last=False)
    counts = Counter(i for part in parts for i in part)
    assert [len(p) for p in parts] == [3, 3, 3, 3]
    assert set(counts) == set(range(10))
    assert sum(counts.values()) == 12  # two samples repeated


def test_padding_with_fewer_samples_than_ranks():
    _, parts = shards(2, 5, shuffle=False)
    assert parts == [[0], [1], [0], [1], [0]]


def test_epochs_differ_and_are_reproducible():
    sampler = ResumableDistributedSampler(50, 1, 0, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    again = ResumableDistributedSampler(50, 1, 0, seed=3)
    again.set_epoch(1)
    assert list(again) == epoch1


def test_resume_mid_epoch_gives_the_same_remaining_order():
    batch_size = 3
    for rank in range(2):
        sampler = ResumableDistributedSampler(23, 2, rank, seed=5, drop_last=True)
        sampler.set_epoch(2)
        full = list(sampler)
        resumed = ResumableDistributedSampler(23, 2, rank, seed=5, drop_last=True)
        resumed.set_epoch(2)
        resumed.set_start(batch_index=2, batch_size=batch_size)
        assert list(resumed) == full[2 * batch_size:]
        assert len(resumed) == len(full) - 2 * batch_size
        resumed.set_epoch(3)  # a new epoch starts from its beginning
        assert len(list(resumed)) == len(full)


@pytest.mark.parametrize("done_per_rank, expected_lengths", [(12, [5, 5, 5]), (10, [6, 6, 6])])
def test_resume_with_another_world_size_continues_the_epoch_without_repeats(done_per_rank, expected_lengths):
    old_samplers, _ = shards(40, 2, seed=9, drop_last=True)
    consumed = set()
    for sampler in old_samplers:
        consumed.update(list(sampler)[:done_per_rank])
    new_samplers = [ResumableDistributedSampler(40, 3, rank, seed=9, drop_last=True) for rank in range(3)]
    for sampler in new_samplers:
        sampler.skip(2 * done_per_rank)
    parts = [list(s) for s in new_samplers]
    remaining = [i for part in parts for i in part]
    # the epoch list holds 39 samples for 3 ranks; what is left is cut to a multiple of 3
    assert [len(p) for p in parts] == expected_lengths
    assert [len(s) for s in new_samplers] == expected_lengths
    assert consumed.isdisjoint(remaining)
    assert len(set(remaining)) == len(remaining)
    assert set(remaining) <= set(new_samplers[0].epoch_indices()[2 * done_per_rank:].tolist())


def test_invalid_resume_position():
    sampler = ResumableDistributedSampler(10, 2, 0)
    with pytest.raises(ValueError):
        sampler.skip(11)


def test_eval_shards_are_exact_and_contiguous():
    assert [list(eval_shard(10, 3, rank)) for rank in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(eval_shard(2, 3, rank)) for rank in range(3)] == [1, 1, 0]
    for n, replicas in [(1000, 8), (7, 4), (3, 3)]:
        joined = [i for rank in range(replicas) for i in eval_shard(n, replicas, rank)]
        assert joined == list(range(n))


def test_a_rank_holds_only_its_share_as_one_array():
    samplers = [ResumableDistributedSampler(1000, 4, rank, seed=3, drop_last=True) for rank in range(4)]
    for sampler in samplers:
        sampler.set_epoch(2)
        sampler.skip(40)
    shares = [sampler.rank_indices() for sampler in samplers]
    assert all(share.dtype == torch.int64 and share.is_contiguous() for share in shares)
    assert all(share.untyped_storage().nbytes() == 8 * len(sampler) for share, sampler in zip(shares, samplers))
    full = samplers[0].epoch_indices()
    assert torch.equal(torch.stack(shares, dim=1).reshape(-1), full[40:])  # the ranks interleave the epoch order
    assert [type(i) for i in list(samplers[1])[:3]] == [int, int, int]
