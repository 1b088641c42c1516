"""Smoke test of `python -m benchmarks.gpu` at the tiny shape (no timing assertions)."""

import pytest

from benchmarks import gpu

TINY = ["--shape", "tiny", "--steps", "2", "--skip", "1", "--precision", "32-true"]


@pytest.mark.parametrize("objective", ["ntp", "meap", "mlm"])
def test_benchmark_runs_all_three_sides_and_prints_the_table(objective, capsys):
    argv = [*TINY, "--objective", objective]
    sides = gpu.main(argv)
    assert list(sides) == ["plain", "trainer", "hf"]
    for side in sides.values():
        assert side.tokens_per_step == 4 * 64 and side.step_seconds > 0 and side.tokens_per_sec > 0
    counts = gpu.build(gpu.parse_args(argv), gpu.SHAPES["tiny"]())[0].flop_counts
    flops = sides["plain"].flops_per_step
    if objective == "mlm":  # the head on the ~15% masked positions
        assert counts.training_flops(4, 64, 4 * 64 // 20) < flops < counts.training_flops(4, 64, 4 * 64 // 4)
    else:  # every position but the last predicts the next token
        assert flops == counts.training_flops(4, 64, 4 * 63)
    out = capsys.readouterr().out
    for row in (
        "| Lightning Trainer, masklab loss |",
        "| throughput Lightning Trainer / plain loop |",
        "| throughput masklab loss / transformers' own loss (plain loops) |",
        "| MFU, Lightning Trainer | n/a",
    ):
        assert row in out


def test_mfu_uses_the_given_peak(capsys):
    trainer = gpu.main([*TINY, "--peak-flops", "1e9"])["trainer"]
    assert (
        f"| MFU, Lightning Trainer | {trainer.flops_per_step / trainer.step_seconds / 1e9:.1%} of 0.001 TFLOP/s |"
        in capsys.readouterr().out
    )
