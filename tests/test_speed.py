"""Speed switches (issue 9): each trains a few steps through the entry point; MFU logging."""

import pytest

from experiments.run import main
from tests.test_run import scalars


def run(config: str, tiny_args: list[str], *extra: str):
    return main(["--config", f"experiments/configs/{config}.yaml", *tiny_args, *extra])


def test_mfu_is_logged_next_to_tokens_per_sec_when_the_peak_is_known(tiny_args, tmp_path):
    cli = run("ntp", tiny_args, "--throughput.window_size", "2", "--throughput.peak_flops", "1e9")
    logged = scalars(tmp_path / "runs" / "ntp" / "version_0")
    assert {"perf/tokens_per_sec", "perf/flops_per_sec", "perf/mfu"} <= set(logged)
    per_batch = cli.model.flop_counts.training_flops(4, 32, 4 * 31)  # batch 4 x 32, next token at 31 positions
    for step, mfu in logged["perf/mfu"].items():
        flops_per_sec = logged["perf/flops_per_sec"][step]
        assert mfu == pytest.approx(flops_per_sec / 1e9, rel=1e-5) and mfu > 0
        assert flops_per_sec / logged["perf/batches_per_sec"][step] == pytest.approx(per_batch, rel=1e-4)


def test_no_mfu_on_a_device_without_a_known_peak(tiny_args, tmp_path):
    run("mlm_random", tiny_args, "--throughput.window_size", "2")
    logged = scalars(tmp_path / "runs" / "mlm_random" / "version_0")
    assert "perf/flops_per_sec" in logged and "perf/mfu" not in logged
