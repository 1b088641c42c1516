"""Worker of the FSDP export test (tests/test_gpu_path.py): two CPU ranks on gloo shard a tiny
Llama module with FSDP, gather its state dict and rank 0 writes `hf_model/`. Forked from the
test process, so the ranks import nothing."""

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from callbacks.export import exported_state_dict
from lightning_modules import CausalLMModule
from tests.test_lightning_modules import TINY


def build() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(**TINY)


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    module = build()
    total = sum(p.numel() for p in module.parameters())
    sharded = FullyShardedDataParallel(
        module, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu")
    )
    local = sum(p.numel() for p in sharded.parameters())
    assert local < total, (local, total)  # this rank holds a shard only
    state = exported_state_dict(sharded)
    if rank == 0:
        module.export_model().save_pretrained(out, state_dict=state)
    dist.barrier()
    dist.destroy_process_group()
