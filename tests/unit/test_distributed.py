"""tdm_r1.distributed without processes: how rows, random draws and evaluation items are split, where a rank's
models and rewards run (on a fake device map), the DeepSpeed config mapping."""

import json
import re

import pytest
import torch

from tdm_r1.config import ConfigError, DistributedConfig, load_config
from tdm_r1.distributed import LOCAL, Dist, Split, deepspeed_config, device_for, epoch_split, rank_device
from tdm_r1.evaluate import gather_share, rank_share


def test_each_rank_holds_an_equal_contiguous_slice_of_every_micro_batch():
    # P=3 prompts x G=4 in micro-batches of 2 groups: [0, 8) and the rest [8, 12); 2 ranks
    splits = [Split(12, 8, 4, rank, 2) for rank in (0, 1)]
    assert splits[0].rows().tolist() == [0, 1, 2, 3, 8, 9]
    assert splits[1].rows().tolist() == [4, 5, 6, 7, 10, 11]
    for split in splits:
        (s0, sh0), (s1, sh1) = split.micro_batches()
        assert (s0, s1) == (slice(0, 4), slice(4, 6))
        assert (sh0.size, sh0.groups, sh0.first_group) == (8, 2, 0)
        assert (sh1.size, sh1.groups, sh1.first_group) == (4, 1, 2)
    assert splits[1].micro_batches()[1][1].lo == 2  # rows 10, 11 are rows 2, 3 of the last micro-batch


def test_a_rank_draws_for_the_whole_micro_batch_and_keeps_its_rows():
    whole = torch.randn((6, 3, 2), generator=torch.Generator().manual_seed(5))
    split = Split(6, 6, 3, 1, 3)
    ((_, shard),) = split.micro_batches()
    mine = shard.randn((3, 2), torch.Generator().manual_seed(5))
    assert torch.equal(mine, whole[2:4])
    one = Split(6, 6, 3).micro_batches()[0][1]
    assert torch.equal(one.randn((3, 2), torch.Generator().manual_seed(5)), whole)


def test_uneven_split_is_a_clear_error():
    with pytest.raises(ConfigError, match="global micro-batches of 3 samples .* do not split over 2 ranks"):
        Split(6, 3, 3, 0, 2)
    tc = load_config(None, ["train.micro_batch_groups=2", "train.group_size=8"]).train
    with pytest.raises(ConfigError, match="micro_batch_per_gpu=4 on 1 ranks needs global micro-batches of 4"):
        epoch_split(tc, LOCAL, micro_batch_per_gpu=4)


def test_local_collectives_are_the_identity():
    t = torch.randn(5)
    assert LOCAL.all_reduce_sum(t) is t and LOCAL.mean(t) is t and LOCAL.group_score_sum(3) is None
    assert LOCAL.mean_metrics({"a": 1.0}) == {"a": 1.0} and LOCAL.broadcast_object([1]) == [1]


def test_distributed_section_maps_onto_a_deepspeed_config():
    ds = deepspeed_config(DistributedConfig(zero_stage=3, bf16=True, param_persistence_threshold=0), grad_clip=1.0)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 1.0 and ds["managed_gradient_accumulation"] is False
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    off = deepspeed_config(DistributedConfig(zero_stage=3, offload_optimizer=True, offload_params=True), 1.0)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu"
    # fp32 without ZeRO: DeepSpeed reports no norm, so the optimizer clips (and DeepSpeed must not clip again)
    assert deepspeed_config(DistributedConfig(zero_stage=0, bf16=False), 1.0)["gradient_clipping"] == 0.0
    with pytest.raises(ConfigError, match="offload_params needs distributed.zero_stage: 3"):
        deepspeed_config(DistributedConfig(zero_stage=2, offload_params=True), 1.0)


def test_raw_deepspeed_json_is_used_with_the_trainer_keys(tmp_path):
    for name in ("zero2", "zero3", "zero3_offload"):
        ds = deepspeed_config(DistributedConfig(ds_config=f"configs/ds/{name}.json"), grad_clip=0.5)
        assert ds["gradient_clipping"] == 0.5 and ds["managed_gradient_accumulation"] is False
        assert ds["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="has an 'optimizer' section; each role's AdamW comes from `optim:`"):
        deepspeed_config(DistributedConfig(ds_config=str(bad)), 1.0)


@pytest.mark.parametrize(("n", "world"), [(7, 2), (8, 2), (5, 3), (1, 4), (64, 8)])
def test_rank_shares_cover_every_item_once_in_equal_blocks(n, world):
    shares = [rank_share(n, Dist(rank=r, world=world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # every rank samples equally many (collective forwards)
    flat = [i for s in shares for i in s]
    assert flat[:n] == list(range(n))  # in order: gathering the ranks' blocks and cutting at n restores the items
    assert all(i == n - 1 for i in flat[n:])  # the padding repeats the last item and is cut away
    assert rank_share(n) == list(range(n))


def test_gather_share_of_one_process_is_the_identity():
    t = torch.arange(5.0)
    assert gather_share(t, 5) is t


@pytest.mark.parametrize(
    ("requested", "local_rank", "gpus", "expected"),
    [
        ("auto", 0, 0, "cpu"),  # a CPU machine
        ("auto", 3, 0, "cpu"),
        ("auto", 3, 8, "cuda:3"),  # a node whose ranks see every GPU
        ("auto", 5, 1, "cuda:0"),  # one CUDA_VISIBLE_DEVICES per rank: each sees only its own
        ("cuda", 2, 4, "cuda:2"),
        ("cuda:1", 0, 2, "cuda:1"),
        ("cpu", 3, 8, "cpu"),
    ],
)
def test_device_for_a_rank_on_a_fake_device_map(requested, local_rank, gpus, expected):
    assert device_for(requested, local_rank, gpus) == torch.device(expected)


@pytest.mark.parametrize(
    ("requested", "local_rank", "gpus", "message"),
    [
        ("cuda", 0, 0, "no CUDA device is visible"),
        ("auto", 4, 2, "local rank 4 has no GPU of its own: 2 are visible"),
        ("cuda:2", 0, 2, "only 2 CUDA device(s) are visible"),
        ("gpu", 0, 2, "expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_device_for_names_what_is_missing(requested, local_rank, gpus, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        device_for(requested, local_rank, gpus)


def test_rewards_go_to_the_rank_s_gpu(monkeypatch):
    from tdm_r1.rewards.base import reward_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert reward_device("auto") == torch.device("cuda", 2) == rank_device()
    assert reward_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert reward_device("auto") == torch.device("cpu")
