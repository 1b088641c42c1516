"""AMLM: the update rule, the policy's sampling, DDP, resume, and bad input."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from callbacks.adaptive_masking import AdaptiveMaskingCallback, difficulty_targets, update_weights
from callbacks.ratio_schedule import MaskRatioSchedule
from core.errors import ConfigError
from datamodules.collate import MaskingCollator
from datamodules.masking import IGNORE_INDEX, TokenBlock
from datamodules.policies.adaptive import AdaptiveMLMMask
from lightning_modules.base import TokenStats
from tests.conftest import MASK, make_vocab, random_ids


def counters(**values):
    vocab_size = 4
    base = {
        name: torch.zeros(vocab_size)
        for name in ("correct", "seen", "masked_loss", "masked_seen", "entropy", "entropy_seen")
    }
    base.update({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()})
    return base


def test_hard_targets_by_hand():
    c = counters(correct=[0, 9, 3, 0], seen=[0, 9, 5, 1])
    # acc = (correct + .5) / (seen + 1) = .5, .95, .5833, .25
    expected = 0.4 * (1 - torch.tensor([0.5, 0.95, 3.5 / 6, 0.25]))
    torch.testing.assert_close(difficulty_targets(c, "accuracy", 0.4), expected)


def test_soft_targets_by_hand():
    log_v = math.log(4)
    c = counters(masked_loss=[0, 2.0, 6.0, 1.0], masked_seen=[0, 2, 2, 4])
    mean = torch.tensor([log_v / 1, (2 + log_v) / 3, (6 + log_v) / 3, (1 + log_v) / 5]) / log_v
    expected = 0.2 * (mean - mean.min()) / (mean.max() - mean.min())
    torch.testing.assert_close(difficulty_targets(c, "loss", 0.2), expected)
    assert difficulty_targets(c, "loss", 0.2).max().item() == pytest.approx(0.2)


def test_update_smooths_floors_and_renormalises_to_mean_p():
    weights = torch.tensor([0.15, 0.15, 0.15, 0.15])
    targets = torch.tensor([0.3, 0.0, 0.15, 0.001])
    new = update_weights(weights, targets, ratio=0.15, smoothing=0.2, floor=0.005)
    raw = (0.2 * weights + 0.8 * targets).clamp_min(0.005)  # .27, .03, .15, .0308
    torch.testing.assert_close(new, 0.15 * 4 * raw / raw.sum())
    assert new.mean().item() == pytest.approx(0.15)
    floored = update_weights(torch.zeros(4), torch.tensor([0.0, 0.0, 0.0, 1.0]), ratio=0.15, smoothing=0.0, floor=0.005)
    assert (floored[:3] > 0).all()  # the floor keeps every type maskable


def test_accumulate_counts_labelled_positions_per_type():
    callback = AdaptiveMaskingCallback()
    callback._reset(6, torch.device("cpu"))
    labels = torch.tensor([[2, IGNORE_INDEX, 5], [5, 5, IGNORE_INDEX]])
    inputs = torch.tensor([[MASK, 1, 3], [MASK, 5, 0]])
    stats = TokenStats(
        labels,
        inputs,
        torch.tensor([[1.0, 9.0, 2.0], [3.0, 4.0, 9.0]]),
        torch.tensor([[True, False, False], [True, True, False]]),
        None,
    )
    callback.accumulate(stats, MASK)
    c = callback.counters
    assert c["seen"].tolist() == [0, 0, 1, 0, 0, 3] and c["correct"].tolist() == [0, 0, 1, 0, 0, 2]
    assert c["masked_seen"].tolist() == [0, 0, 1, 0, 0, 1]  # only positions whose input is [MASK]
    assert c["masked_loss"].tolist() == [0, 0, 1.0, 0, 0, 3.0]
    assert c["seen"].dtype == torch.int64 and c["masked_loss"].dtype == torch.float32


def test_policy_masks_hard_types_more_and_keeps_p_times_l_per_sequence():
    vocab = make_vocab(64)
    policy = AdaptiveMLMMask()
    policy.ratio = 0.15
    policy.setup(vocab)
    policy.weights[20:40] *= 4  # "hard" types: 4x the weight of the others
    ids = random_ids(3000, 64, vocab)
    block = TokenBlock.from_ids(ids, vocab)
    p = policy.token_probabilities(block)
    maskable = (~block.special).sum(1).float()
    torch.testing.assert_close(p.sum(1), 0.15 * maskable)  # expected count p·L per sequence
    masked = policy.select(block, torch.Generator().manual_seed(0))
    hard = (ids >= 20) & (ids < 40)
    easy = ids >= 40
    rate_hard, rate_easy = masked[hard].float().mean(), masked[easy].float().mean()
    assert rate_hard / rate_easy == pytest.approx(4.0, rel=0.05)
    assert not masked[block.special].any()


def test_updated_weights_reach_persistent_worker_processes():
    from torch.utils.data import DataLoader

    from datamodules.pretraining import IndexedBlocks

    vocab = make_vocab(64)
    policy = AdaptiveMLMMask()
    policy.ratio = 0.15
    policy.setup(vocab)
    ids = random_ids(128, 64, vocab)
    loader = DataLoader(
        IndexedBlocks(ids.int().numpy()),
        batch_size=32,
        num_workers=2,
        persistent_workers=True,
        collate_fn=MaskingCollator(policy, vocab, 0),
        prefetch_factor=1,
    )
    hard = (ids >= 20) & (ids < 30)

    def hard_share():
        masked = torch.cat([b["masked"] for b in loader])
        return masked[hard].float().mean().item() / masked.float().mean().item()

    before = hard_share()
    policy.weights.copy_(torch.where((torch.arange(64) >= 20) & (torch.arange(64) < 30), 1.0, 0.01))
    after = hard_share()
    assert 0.8 < before < 1.2 and after > 3


def _ddp_worker(rank, world, port, shards, result):
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    callback, policy = _callback_and_policy()

    class Strategy:
        @staticmethod
        def reduce(tensor, reduce_op):
            dist.all_reduce(tensor)
            return tensor

    for stats in shards[rank]:
        callback.accumulate(stats, MASK)
    callback.update(_FakeTrainer(Strategy), _FakeModule())
    result[rank] = policy.weights.clone()
    dist.destroy_process_group()


class _FakeTrainer:
    is_global_zero = False
    logger = None

    def __init__(self, strategy):
        self.strategy = strategy


class _FakeModule:
    def log_dict(self, *args, **kwargs):
        pass


def _callback_and_policy():
    policy = AdaptiveMLMMask()
    policy.ratio = 0.15
    policy.setup(make_vocab(16))
    callback = AdaptiveMaskingCallback(every_n_batches=1)
    callback.policy = policy
    callback._reset(16, torch.device("cpu"))
    return callback, policy


def _random_stats(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, 16, (4, 8), generator=g)
    labels[torch.rand(4, 8, generator=g) < 0.5] = IGNORE_INDEX
    return TokenStats(
        labels, torch.full((4, 8), MASK), torch.rand(4, 8, generator=g), torch.rand(4, 8, generator=g) < 0.5, None
    )


def test_ddp_ranks_agree_and_equal_one_process_over_the_union():
    shards = [[_random_stats(0), _random_stats(1)], [_random_stats(2)]]
    result = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, 29500 + torch.randint(0, 1000, ()).item(), shards, result), nprocs=2, join=True)
    single, policy = _callback_and_policy()

    class Identity:
        @staticmethod
        def reduce(tensor, reduce_op):
            return tensor

    for stats in shards[0] + shards[1]:
        single.accumulate(stats, MASK)
    single.update(_FakeTrainer(Identity), _FakeModule())
    torch.testing.assert_close(result[0], result[1])
    torch.testing.assert_close(result[0], policy.weights)
    assert not torch.allclose(policy.weights, torch.full((16,), 0.15))


def test_ratio_schedule_linear_and_cosine():
    linear = MaskRatioSchedule(0.4, 0.15)
    assert [round(linear.ratio_at(s, 100), 4) for s in (0, 50, 100, 150)] == [0.4, 0.275, 0.15, 0.15]
    cosine = MaskRatioSchedule(0.4, 0.15, shape="cosine")
    assert cosine.ratio_at(50, 100) == pytest.approx(0.275) and cosine.ratio_at(25, 100) > linear.ratio_at(25, 100)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AdaptiveMaskingCallback(scoring="hardest"), "scoring must be 'accuracy', 'loss' or 'entropy'"),
        (lambda: AdaptiveMaskingCallback(smoothing=1.0), "smoothing must be in [0, 1)"),
        (lambda: AdaptiveMaskingCallback(every_n_batches=0), "every_n_batches must be >= 1"),
        (lambda: MaskRatioSchedule(start=0.15, end=0.4), "end=0.4 is above start=0.15"),
    ],
)
def test_bad_settings_name_the_key(make, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
        make()


def _amlm_callbacks(every: int, floor: float = 0.005, end: float = 0.15) -> str:
    import json

    return json.dumps(
        [
            {"class_path": "callbacks.MaskRatioSchedule", "init_args": {"start": 0.4, "end": end}},
            {
                "class_path": "callbacks.AdaptiveMaskingCallback",
                "init_args": {"every_n_batches": every, "floor": floor},
            },
        ]
    )


def _histogram_steps(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0})
        accumulator.Reload()
        if "mask/type_weights" in accumulator.Tags()["histograms"]:
            steps += [e.step for e in accumulator.Histograms("mask/type_weights")]
    return sorted(steps)


@pytest.mark.parametrize("end", [0.4, 0.15])
def test_amlm_run_updates_every_n_steps_and_resumes_exactly(end, tiny_args, tmp_path):
    """With a constant ratio the resumed run is exact (weights, losses). With a decaying ratio the
    logged ratio still matches step for step, but the two batches prefetched at resume time are
    masked with the ratio of the resume step (README: the prefetch lag), so only the ratio and
    the update schedule are compared."""
    from experiments.run import main
    from tests.test_run import scalars

    common = [
        *tiny_args,
        "--trainer.max_steps",
        "8",
        "--trainer.callbacks",
        _amlm_callbacks(3, end=end),
        "--checkpoint.every_n_train_steps",
        "1",
        "--checkpoint.monitor",
        "null",
    ]
    main(
        [
            "--config",
            "experiments/configs/amlm_hard.yaml",
            *common,
            "--experiment",
            "full",
            "--checkpoint.save_top_k",
            "-1",
            "--checkpoint.filename",
            "step{step}",
        ]
    )
    full_dir = tmp_path / "runs" / "full" / "version_0"
    assert _histogram_steps(full_dir) == [3, 6]  # first update at step 3, never at step 0
    resumed_dir = tmp_path / "runs" / "part" / "version_0" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    (resumed_dir / "last.ckpt").write_bytes((full_dir / "checkpoints" / "step4.ckpt").read_bytes())
    main(["--config", "experiments/configs/amlm_hard.yaml", *common, "--experiment", "part", "--ckpt_path", "last"])

    def final_state(run_dir):
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("AdaptiveMaskingCallback"))

    full, resumed = final_state(full_dir), final_state(resumed_dir.parent)
    assert not torch.allclose(full["weights"], full["weights"].mean().expand_as(full["weights"]))
    full_ratio, resumed_ratio = scalars(full_dir)["mask/ratio"], scalars(resumed_dir.parent)["mask/ratio"]
    assert sorted(resumed_ratio) == [4, 5, 6, 7]
    assert all(resumed_ratio[s] == pytest.approx(full_ratio[s]) for s in resumed_ratio)
    assert full_ratio[0] == pytest.approx(0.4) and full_ratio[7] == pytest.approx(0.4 + (end - 0.4) * 7 / 8)
    if end != 0.4:
        return
    torch.testing.assert_close(resumed["weights"], full["weights"])
    torch.testing.assert_close(
        torch.tensor([scalars(resumed_dir.parent)["train/loss"][s] for s in (5, 6, 7)]),
        torch.tensor([scalars(full_dir)["train/loss"][s] for s in (5, 6, 7)]),
    )


def test_floor_at_or_above_the_ratio_is_refused(tiny_args, capsys):
    from experiments.run import main

    with pytest.raises(SystemExit):
        main(
            [
                "--config",
                "experiments/configs/amlm_hard.yaml",
                *tiny_args,
                "--trainer.callbacks",
                _amlm_callbacks(3, floor=0.5),
            ]
        )
    assert "AdaptiveMaskingCallback.floor=0.5 must be below the mask ratio 0.4" in capsys.readouterr().err


def test_adaptive_callback_needs_the_adaptive_policy(tiny_args, capsys):
    from experiments.run import main

    with pytest.raises(SystemExit):
        main(
            [
                "--config",
                "experiments/configs/amlm_hard.yaml",
                *tiny_args,
                "--data.masking",
                "datamodules.RandomMLMMask",
            ]
        )
    assert "AdaptiveMaskingCallback needs data.masking=AdaptiveMLMMask, got RandomMLMMask" in capsys.readouterr().err


def test_low_selection_inverts_the_score():
    c = counters(correct=[0, 9, 3, 0], seen=[0, 9, 5, 1])
    high, low = difficulty_targets(c, "accuracy", 0.4, "high"), difficulty_targets(c, "accuracy", 0.4, "low")
    torch.testing.assert_close(high + low, torch.full((4,), 0.4))


def test_entropy_scoring_masks_uncertain_types():
    c = counters(entropy=[0, 8.0, 1.0, 0], entropy_seen=[0, 4, 4, 0])
    targets = difficulty_targets(c, "entropy", 0.2)
    assert targets[1] == pytest.approx(0.2) and targets[2] < targets[0] < targets[1]
