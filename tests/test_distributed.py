"""Two ranks on gloo (torch.distributed, CPU) split each block's layers and write the file one
process writes, byte for byte (physkern.distributed, issue 18 item 5)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

from physkern.config import CodebookConfig, ScalarConfig
from physkern.distributed import Dist
from physkern.streaming import quantize_streaming

CALIB = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))

RANKS = textwrap.dedent("""
    import sys, torch
    import torch.distributed as td
    import torch.multiprocessing as mp
    from physkern.config import CodebookConfig, ScalarConfig
    from physkern.streaming import quantize_streaming
    import transformers.models.llama.modeling_llama  # imported once, before the fork

    def work(rank, src, out, port, world):
        torch.set_num_threads(1)
        td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                              world_size=world)
        calib = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
        r = quantize_streaming(src, out, CodebookConfig(k=12, block_dim=2, scope="layer",
                               iters=3), calib, embedding=ScalarConfig(bits=4, group_size=16),
                               progress=False, activations=sys.argv[5])
        assert (r is None) == (rank != 0)
        td.destroy_process_group()

    if __name__ == "__main__":
        src, out, port, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        mp.start_processes(work, args=(src, out, port, world), nprocs=world,
                           start_method="fork")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_owners_balanced_and_deterministic():
    sizes = [10, 10, 10, 40, 20, 20, 30]
    assert Dist(0, 1).owners(sizes) == [0] * 7
    owners = Dist(1, 2).owners(sizes)
    assert owners == Dist(0, 2).owners(sizes)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert sorted(load) == [70, 70]


def test_two_gloo_ranks_write_the_one_rank_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True)).eval().save_pretrained(tmp_path / "src")
    quantize_streaming(tmp_path / "src", tmp_path / "one", CodebookConfig(
        k=12, block_dim=2, scope="layer", iters=3), CALIB,
        embedding=ScalarConfig(bits=4, group_size=16), progress=False)
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "src"),
                        str(tmp_path / "two"), str(_free_port()), "2", "disk"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
