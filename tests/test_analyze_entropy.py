import json

import pytest

from experiments.analyze_entropy import main
from experiments.run import main as run_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEYS = {
    "model",
    "objective",
    "n_tokens",
    "mean_entropy",
    "accuracy",
    "mean_loss",
    "forking_threshold",
    "forking_share",
    "forking_entropy_share",
    "top20_entropy_share",
    "quantiles",
    "histogram",
    "by_position",
    "by_frequency",
    "plots",
}


@pytest.mark.parametrize(("config", "objective"), [("ntp", "causal"), ("mlm_random", "mlm")])
def test_analysis_of_a_tiny_run_writes_json_and_plots(config, objective, tiny_args, tmp_path):
    run_main(["--config", f"experiments/configs/{config}.yaml", *tiny_args, "--trainer.max_steps", "3"])
    run = tmp_path / "runs" / config / "version_0"
    summary = main(["--run", str(run), "--documents", "20", "--max-blocks", "8"])
    out = run / "analysis" / "entropy"
    written = json.loads((out / "entropy.json").read_text())  # strict JSON: no NaN
    assert set(written) >= KEYS and written["objective"] == objective
    assert written["block_size"] == 32  # the run's own
    for name in written["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert len(written["plots"]) == 3
    # every regular token is scored once: causal = all but the first of a block; MLM = all
    positions = {b["name"]: b for b in written["by_position"]}
    assert {"earlier", "-3", "penultimate", "last", "unfinished sentence"} <= set(positions)
    assert sum(b["count"] for b in written["by_position"]) == written["n_tokens"]
    assert sum(b["count"] for b in written["by_frequency"]) == written["n_tokens"]
    assert sum(written["histogram"]["counts"]) == written["n_tokens"]
    assert written["n_tokens"] > 200 and 0 <= summary["forking_share"] <= 1


def test_an_hf_model_folder_and_a_text_file_work_too(tiny_args, tmp_path):
    run_main(["--config", "experiments/configs/ntp.yaml", *tiny_args, "--trainer.max_steps", "1"])
    text = tmp_path / "held_out.txt"
    text.write_text(
        "\n\n".join(f"The cat number {i} sat on the mat. A dog ran away! Did it come back?" for i in range(30))
    )
    hf_model = tmp_path / "runs" / "ntp" / "version_0" / "hf_model"
    summary = main(["--run", str(hf_model), "--text", str(text), "--block-size", "16", "--out", str(tmp_path / "out")])
    assert summary["block_size"] == 16 and (tmp_path / "out" / "entropy.json").exists()


def test_a_path_without_a_model_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "neither a run dir with an hf_model/ folder nor an hf_model folder" in capsys.readouterr().err
