"""Weighted sampling stays weighted under DDP: frequencies follow the weights, weight 0 is never
drawn, and ranks draw disjoint shares of one sample."""

from __future__ import annotations

import numpy as np
import pytest

from workers import WeightedDistributedSampler

WEIGHTS = [0.0, 1.0, 2.0, 0.0, 4.0, 1.0]


def draw_all(world: int, epochs: int, num_samples: int) -> list[list[int]]:
    per_rank: list[list[int]] = [[] for _ in range(world)]
    for rank in range(world):
        sampler = WeightedDistributedSampler(WEIGHTS, num_samples, num_replicas=world, rank=rank, seed=7)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            per_rank[rank] += list(sampler)
    return per_rank


def check_frequencies(drawn: list[int]) -> None:
    counts = np.bincount(drawn, minlength=len(WEIGHTS))
    assert counts[0] == 0 and counts[3] == 0
    expected = np.asarray(WEIGHTS) / sum(WEIGHTS)
    assert np.abs(counts / counts.sum() - expected).max() < 0.02


def test_single_process_frequencies() -> None:
    check_frequencies(draw_all(1, 20, 1000)[0])


def test_two_ranks_split_one_weighted_sample() -> None:
    ranks = draw_all(2, 20, 1000)
    assert len(ranks[0]) == len(ranks[1]) == 20 * 500  # equal steps per rank (DDP needs it)
    check_frequencies(ranks[0] + ranks[1])
    # the union over ranks is exactly what one process draws with the same seed
    one = WeightedDistributedSampler(WEIGHTS, 1000, num_replicas=1, rank=0, seed=7)
    two = [WeightedDistributedSampler(WEIGHTS, 1000, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    merged = [x for pair in zip(*(list(s) for s in two)) for x in pair]
    assert merged == list(one)


def test_epochs_differ_and_are_reproducible() -> None:
    s = WeightedDistributedSampler(WEIGHTS, 50, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [1.0, float("nan")], []])
def test_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weight"):
        WeightedDistributedSampler(weights, 10)


def _ddp_draws(config: dict) -> list[int]:
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    sampler = WeightedDistributedSampler(
        config["weights"], config["num_samples"], ctx.get_world_size(), ctx.get_world_rank(), seed=3
    )
    mine: list[int] = []
    for epoch in range(config["epochs"]):
        sampler.set_epoch(epoch)
        mine += list(sampler)
    gathered: list[list[int]] = [[] for _ in range(ctx.get_world_size())]
    dist.all_gather_object(gathered, mine)
    assert torch.distributed.get_world_size() == 2
    return [x for part in gathered for x in part]


@pytest.mark.ray
def test_frequencies_with_two_ray_train_ddp_workers(ray_cluster: None, tmp_path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ddp_draws,
        train_loop_config={"weights": WEIGHTS, "num_samples": 600, "epochs": 30},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="sampler", storage_path=str(tmp_path)),
    )
    drawn = trainer.fit().return_value
    assert len(drawn) == 600 * 30
    check_frequencies(drawn)
