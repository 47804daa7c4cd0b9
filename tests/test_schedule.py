"""Warm-up + step-decay schedule against hand values, and its LambdaLR wrapper on several param groups."""

import pytest
import torch
from torch import nn

from uniperceiver_v2.engine.optim import MTAdamW
from uniperceiver_v2.engine.schedule import WarmupStepSchedule, build_lr_scheduler


def test_paper_schedule_hand_values():
    # Paper: 200k iterations, x0.1 at 160k; warm-up of 1000 iterations from 0.001.
    schedule = WarmupStepSchedule(total_iterations=200_000, warmup_iterations=1000)
    assert schedule.milestones == [160_000]
    assert schedule.lr_factor(0) == pytest.approx(0.001)
    assert schedule.lr_factor(500) == pytest.approx(0.001 + 0.999 * 0.5)
    assert schedule.lr_factor(999) == pytest.approx(0.001 + 0.999 * 0.999)
    assert schedule.lr_factor(1000) == 1.0
    assert schedule.lr_factor(159_999) == 1.0
    assert schedule.lr_factor(160_000) == pytest.approx(0.1)
    assert schedule.lr_factor(199_999) == pytest.approx(0.1)


def test_two_decays_without_warmup():
    schedule = WarmupStepSchedule(total_iterations=100, decay_fractions=(0.5, 0.75), decay_factor=0.2)
    assert schedule.milestones == [50, 75]
    assert [schedule(i) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04])


def test_lambda_lr_scales_every_group_and_keeps_ratios():
    encoder, decoder = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = MTAdamW(
        [{"params": encoder.parameters(), "lr": 1e-5}, {"params": decoder.parameters(), "lr": 1e-4}]
    )
    schedule = WarmupStepSchedule(total_iterations=20, warmup_iterations=4, decay_fractions=(0.8,))
    scheduler = build_lr_scheduler(optimizer, schedule)
    for iteration in range(20):
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs == pytest.approx([1e-5 * schedule(iteration), 1e-4 * schedule(iteration)])
        for p in list(encoder.parameters()) + list(decoder.parameters()):
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_survives_weights_only_round_trip(tmp_path):
    layer = nn.Linear(2, 2)
    optimizer = MTAdamW(layer.parameters(), lr=1.0)
    scheduler = build_lr_scheduler(optimizer, WarmupStepSchedule(total_iterations=10, warmup_iterations=2))
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    fresh_optimizer = MTAdamW(layer.parameters(), lr=1.0)
    fresh = build_lr_scheduler(fresh_optimizer, WarmupStepSchedule(total_iterations=10, warmup_iterations=2))
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    fresh.step()
    scheduler.step()
    assert fresh.get_last_lr() == scheduler.get_last_lr() == pytest.approx([0.1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"total_iterations": 0}, "total_iterations"),
        ({"total_iterations": 10, "warmup_iterations": 11}, "warmup_iterations"),
        ({"total_iterations": 10, "decay_fractions": (0.9, 0.5)}, "decay_fractions"),
        ({"total_iterations": 10, "decay_fractions": (1.5,)}, "decay_fractions"),
        ({"total_iterations": 10, "warmup_iterations": 9, "decay_fractions": (0.5,)}, "inside the warm-up"),
        ({"total_iterations": 10, "warmup_start_factor": 0.0}, "warmup_start_factor"),
    ],
)
def test_bad_schedules_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupStepSchedule(**kwargs)
