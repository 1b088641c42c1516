"""Smoke test of `python -m benchmarks.gpu` at the tiny shape (no timing assertions)."""

import pytest
import torch

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


def test_suite_runs_every_row_at_the_tiny_shape_and_prints_one_table(capsys):
    table = gpu.main([*TINY, "--suite"])
    assert [cells[0] for cells in table] == [name for name, _ in gpu.SUITE]
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("CPU; torch ") and " UTC" in out.splitlines()[0]
    assert "| row | Trainer tok/s | MFU |" in out
    ran = {cells[0]: cells for cells in table}
    assert float(ran["134m NTP, B=16, eager"][1].replace(",", "")) > 0  # Trainer tokens/s
    assert float(ran["DeBERTa-v2 MLM, 64 x 512, SDPA"][4]) > 0  # masklab / transformers' loss
    assert ran["134m NTP, B=16, clip 1.0, fused AdamW"][1] != ""  # clipping with fused AdamW trains
    if not torch.cuda.is_available():
        assert ran["134m NTP, B=16, Liger"][1] == "n/a: Liger Kernel needs a CUDA GPU"


def test_suite_stops_starting_rows_once_the_budget_is_spent():
    table = gpu.main([*TINY, "--suite", "--budget", "0"])
    assert table[0][1] != "" and not table[0][1].startswith("skipped")  # the first row always runs
    assert all(cells[1].startswith(("skipped: --budget", "n/a")) for cells in table[1:])


def test_suite_runs_only_the_rows_asked_for():
    table = gpu.main([*TINY, "--suite", "--rows", "^BERT-base|DeBERTa.*SDPA"])
    assert [cells[0] for cells in table] == ["BERT-base MLM, 64 x 512", "DeBERTa-v2 MLM, 64 x 512, SDPA"]
