"""The GPU path (issue 14) on a CPU: bf16 with a fused optimiser and clipping, the peak FLOP/s
table, the speed keys' validation. Tests that need CUDA are skipped without it."""

import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from callbacks import TokenThroughputMonitor
from callbacks.peak_flops import gpu_peak, peak_flops
from core.errors import ConfigError
from experiments.run import main
from lightning_modules import CausalLMModule, MaskedLMModule
from lightning_modules.deberta_sdpa import SdpaDisentangledSelfAttention
from tests.conftest import ACCELERATOR
from tests.test_lightning_modules import TINY as MODULE
from tests.test_lightning_modules import toy_batch
from tests.test_run import CONFIGS, TEACHER

BF16_FUSED = ["--trainer.precision", "bf16-mixed", "--model.init_args.optimizer.fused", "true"]
# 2 steps on a CPU; benchmarks.device_check trains every config 20 steps on the GPU (MASKLAB_TEST_STEPS)
TRAIN_STEPS = int(os.environ.get("MASKLAB_TEST_STEPS", "2"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_trains_in_bf16_with_fused_adamw_and_its_clipping(config, tiny_args, tmp_path):
    text = config.read_text()
    if TEACHER in text:  # a tiny teacher with the same tokenizer first (as tests/test_run.py)
        main(["--config", "experiments/configs/mlm_random.yaml", *tiny_args, "--trainer.max_steps", "1"])
        config = tmp_path / config.name
        models = Path("experiments/configs/models").resolve()  # the copy's relative model path must still resolve
        config.write_text(text.replace(TEACHER, str(tmp_path / TEACHER)).replace(": models/", f": {models}/"))
    cli = main(
        [
            "--config",
            str(config),
            *tiny_args,
            *BF16_FUSED,
            "--trainer.max_steps",
            str(TRAIN_STEPS),
            "--trainer.limit_val_batches",
            "0",
        ]
    )
    assert cli.trainer.global_step == TRAIN_STEPS
    assert cli.trainer.strategy.root_device.type == ("cuda" if ACCELERATOR == "gpu" else "cpu")
    assert cli.trainer.optimizers[0].defaults["fused"] is True
    assert cli.trainer.gradient_clip_val == 1.0  # every shipped config clips


class GradNorms(L.Callback):
    """The total gradient norm the optimiser stepped with: a step post-hook (Lightning runs the
    closure, backward and clipping included, inside `optimizer.step`)."""

    def __init__(self) -> None:
        self.norms = []

    def on_train_start(self, trainer, pl_module) -> None:
        def record(optimizer, *_) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))

        trainer.optimizers[0].register_step_post_hook(record)


class OneBatch(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, mask = toy_batch()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_under_bf16_with_a_fused_optimiser_clips_what_the_optimiser_sees(algorithm):
    torch.manual_seed(0)
    module = CausalLMModule(**MODULE)
    norms = GradNorms()
    clip = 1e-3  # far below the gradients of a fresh model, so every step clips
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        precision="bf16-mixed",
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        callbacks=[norms],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module.optimizer_config = SimpleNamespace(**{**vars(module.optimizer_config), "fused": True})
    trainer.fit(module, torch.utils.data.DataLoader(OneBatch(), batch_size=None))
    assert trainer.optimizers[0].defaults["fused"] is True and len(norms.norms) == 3
    if algorithm == "norm":
        assert norms.norms == pytest.approx([clip] * 3, rel=1e-3)
    else:  # every element within [-clip, clip]
        assert all(p.grad is None or p.grad.abs().max() <= clip for p in module.parameters())


def test_fp16_grad_scaler_unscales_a_fused_optimiser_before_clipping():
    """What Lightning refuses (16-mixed, fused, clipping) done by hand: unscale, clip, then the
    scaler's step must not unscale a second time."""
    torch.manual_seed(0)
    ids, mask = toy_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    reference = CausalLMModule(**MODULE)
    module = CausalLMModule(**MODULE)
    module.load_state_dict(reference.state_dict())
    reference.step(batch)[0].backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    expected = [p.grad.clone() for p in reference.parameters()]

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, fused=True)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), strategy=None)
    scaler.scale(module.step(batch)[0]).backward()
    module.configure_gradient_clipping(optimizer, 0.5, "norm")
    for got, want in zip((p.grad for p in module.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    before = [p.detach().clone() for p in module.parameters()]
    scaler.step(optimizer)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    reference_optimizer.step()
    for after, want in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(after.detach(), want.detach(), rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(module.parameters(), before))


# the strings torch.cuda.get_device_name() returns on these GPUs, and their dense bf16 / fp32 peaks
DEVICE_NAMES = {
    "NVIDIA H200": (989.5e12, 67e12),
    "NVIDIA H200 NVL": (835.5e12, 60e12),
    "NVIDIA GH200 480GB": (989.5e12, 67e12),
    "NVIDIA H100 80GB HBM3": (989.5e12, 66.9e12),
    "NVIDIA H100 PCIe": (756.5e12, 51.2e12),
    "NVIDIA H100 NVL": (835.5e12, 60e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 19.5e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 19.5e12),
    "NVIDIA A100 80GB PCIe": (312e12, 19.5e12),
    "NVIDIA A10G": (125e12, 31.2e12),
    "NVIDIA A10": (125e12, 31.2e12),
    "NVIDIA L4": (121e12, 30.3e12),
    "NVIDIA L40S": (362.05e12, 91.6e12),
    "NVIDIA L40": (181.05e12, 90.5e12),
    "NVIDIA GeForce RTX 4090": (165.2e12, 82.6e12),
    "NVIDIA RTX 6000 Ada Generation": (364.2e12, 91.1e12),
}


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_peak_table_matches_the_real_device_names(name):
    bf16, fp32 = DEVICE_NAMES[name]
    assert peak_flops(name, torch.bfloat16) == bf16 and peak_flops(name, torch.float16) == bf16
    assert torch.get_float32_matmul_precision() == "highest"
    assert peak_flops(name, torch.float32) == fp32
    torch.set_float32_matmul_precision("high")  # fp32 matmuls on tensor cores: TF32
    try:
        assert peak_flops(name, torch.float32) == gpu_peak(name).tf32 > fp32 or name.endswith(("L40", "4090"))
    finally:
        torch.set_float32_matmul_precision("highest")


def test_an_unlisted_gpu_has_no_peak():
    assert peak_flops("Tesla T4", torch.bfloat16) is None and gpu_peak("NVIDIA Foo 9000") is None


@pytest.mark.parametrize(("given", "expected"), [(None, 989.5e12), (1e15, 1e15)])
def test_monitor_takes_the_peak_from_the_table_unless_given(given, expected, monkeypatch):
    """The wiring on a CPU: the device name comes from a patched torch.cuda.get_device_name."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cuda", 0)),
        precision_plugin=MixedPrecision("bf16-mixed", "cuda"),
        enable_validation=True,
        world_size=1,
        state=SimpleNamespace(stage=RunningStage.TRAINING),
    )
    monitor = TokenThroughputMonitor(peak_flops=given)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's own "FLOPs not found for 'NVIDIA H200'" is silenced
        monitor.setup(trainer, None, TrainerFn.FITTING)
    assert monitor.available_flops == expected
    assert [t.available_flops for t in monitor._throughputs.values()] == [expected, expected]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    with pytest.warns(UserWarning, match="no perf/mfu: 'Tesla T4' is not in callbacks/peak_flops.py"):
        TokenThroughputMonitor().setup(trainer, None, TrainerFn.FITTING)


DEBERTA = dict(
    arch="deberta-v2",
    config_overrides={"relative_attention": True, "position_buckets": 8, "pos_att_type": ["p2c", "c2p"]},
)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(
    "overrides",
    [DEBERTA["config_overrides"], {**DEBERTA["config_overrides"], "share_att_key": True}, {}],
    ids=["c2p-p2c", "shared-key", "no-relative"],
)
def test_deberta_sdpa_attention_gives_eager_logits_and_gradients(overrides, device):
    """Compared at the real tokens, the only positions a loss or an evaluation reads: a padded
    query attends to nothing, and the kernels disagree on what that gives (the CPU's math kernel
    averages; on an H200 the fp32 memory-efficient kernel gave other values there, up to 0.17 apart
    in the logits). Nothing flows from a padded position to a real one."""
    torch.manual_seed(0)
    eager = MaskedLMModule(**MODULE, arch="deberta-v2", config_overrides=overrides).to(device)
    sdpa = MaskedLMModule(**MODULE, arch="deberta-v2", config_overrides=overrides, attn_implementation="sdpa")
    sdpa.to(device).load_state_dict(eager.state_dict())
    assert sum(isinstance(m, SdpaDisentangledSelfAttention) for m in sdpa.modules()) == 2
    assert not any(isinstance(m, SdpaDisentangledSelfAttention) for m in eager.modules())
    ids, mask = (t.to(device) for t in toy_batch())  # the first row is padded
    logits = {}
    for name, module in (("eager", eager), ("sdpa", sdpa)):
        logits[name] = module(ids, mask)
        logits[name][mask.bool()].sum().backward()
    real = mask.bool()
    torch.testing.assert_close(logits["sdpa"][real], logits["eager"][real], rtol=0, atol=1e-4)
    for (name, got), want in zip(sdpa.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_deberta_sdpa_exports_a_plain_eager_deberta(tmp_path):
    torch.manual_seed(0)
    module = MaskedLMModule(**MODULE, **DEBERTA, attn_implementation="sdpa").eval()
    module.export_model().save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, SdpaDisentangledSelfAttention) for m in reloaded.modules())
    ids, mask = toy_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, attention_mask=mask).logits, module(ids, mask), atol=1e-4, rtol=0
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without a GPU")
def test_liger_kernel_without_a_gpu_is_one_line(tiny_args, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--config", "experiments/configs/meap.yaml", *tiny_args, "--model.init_args.liger_kernel", "true"])
    err = capsys.readouterr().err
    assert "error: model.liger_kernel=true needs a CUDA GPU (Liger Kernel is Triton code); this machine has none" in err
    assert "Traceback" not in err and not list((tmp_path / "runs").glob("*/version_*"))


def test_liger_and_compiled_loss_together_are_refused():
    with pytest.raises(ConfigError, match="model.liger_kernel and model.compile_loss are two ways"):
        CausalLMModule(**MODULE, liger_kernel=True, compile_loss=True)


def loss_and_grads(module, batch) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    loss, stats = module.step(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()], stats.correct


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_compiled_dense_loss_gives_the_default_loss_accuracy_and_gradients():
    torch.manual_seed(0)
    plain = CausalLMModule(**MODULE)
    compiled = CausalLMModule(**MODULE, compile_loss=True)
    compiled.load_state_dict(plain.state_dict())
    ids, mask = toy_batch()  # padded first row: labels -100 there
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    torch._dynamo.reset()
    want, got = loss_and_grads(plain, batch), loss_and_grads(compiled, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the loss was compiled
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], want[2])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="Liger Kernel needs a CUDA GPU and the liger-kernel package",
)
def test_liger_kernel_gives_the_default_loss_accuracy_and_gradients_on_a_gpu():
    torch.manual_seed(0)
    plain = CausalLMModule(**MODULE).cuda()
    liger = CausalLMModule(**MODULE, liger_kernel=True).cuda()
    liger.load_state_dict(plain.state_dict())
    ids, mask = toy_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    batch = {k: v.cuda() for k, v in batch.items()}
    want, got = loss_and_grads(plain, batch), loss_and_grads(liger, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[2], want[2])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_collate_runs_on_one_thread_and_gives_the_threads_back():
    from datamodules import RandomMLMMask
    from datamodules.collate import MaskingCollator
    from tests.conftest import make_vocab, random_ids

    seen = []

    class Spy(RandomMLMMask):
        def select(self, block, generator):
            seen.append(torch.get_num_threads())
            return super().select(block, generator)

    policy = Spy()
    policy.ratio = 0.15
    vocab = make_vocab()
    collate = MaskingCollator(policy, vocab, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = collate(list(enumerate(random_ids(4, 16, vocab))))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert batch["input_ids"].shape == (4, 16)


def test_fsdp_export_gathers_the_shards_into_a_plain_hf_model(tmp_path):
    """Two CPU ranks (gloo) shard a tiny Llama with FSDP; rank 0 writes hf_model/ from the
    gathered state dict, which must be the unsharded model's."""
    from tests.fsdp_export import build, rank_main

    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.start_processes(
        rank_main, args=(port, str(tmp_path / "hf_model")), nprocs=2, start_method="fork"
    )
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model").state_dict()
    expected = build().model.state_dict()
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name
