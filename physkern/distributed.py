"""torch.distributed for streaming quantization: ranks split the layers of each block.

`torchrun --nproc-per-node N physkern quantize ...` starts N processes; `init_from_env()` joins
them into one process group (gloo on CPU, nccl when every rank has its own GPU). In
physkern.streaming every rank runs the calibration forward of a block (the activations are the
same on every rank), then `Dist.quantize_layers` gives each layer of the block to one rank
(largest first, to the least loaded rank: deterministic), each rank quantizes its own and the
results are broadcast, so every rank holds the whole quantized block before computing the next
block's inputs. Rank 0 alone writes files. The quantizers are deterministic functions of the
weight, the statistics and the seed, so the file is byte for byte the single-process one.
Without a process group (or with one rank) everything here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class Dist:
    """This process's rank and the world size (0 and 1 without torch.distributed)."""
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Dist":
        import torch.distributed as td
        if td.is_available() and td.is_initialized():
            return cls(td.get_rank(), td.get_world_size())
        return cls()

    def broadcast(self, obj, src: int = 0):
        """`obj` of rank `src` on every rank (pickled; any picklable value, tensors on CPU)."""
        if self.world == 1:
            return obj
        import torch.distributed as td
        box = [obj]
        td.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td
            td.barrier()

    def owners(self, sizes: list[int]) -> list[int]:
        """Rank owning each of the items of these sizes: largest first to the least loaded rank
        (ties: the lower rank, the earlier item); the same answer on every rank."""
        load = [0] * self.world
        out = [0] * len(sizes)
        for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            out[j] = r
            load[r] += sizes[j]
        return out

    def quantize_layers(self, model: nn.Module, here: list, stats: dict,
                        quantize_one: Callable) -> list:
        """Quantize the (LinearLayer, config) pairs of one block, split across ranks; returns
        their reports in `here`'s order, every rank's model holding every quantized layer.

        stats: physkern.api.BlockStats (take(name) -> (m2 [in] or None, gram [in, in] or
               None)), or None without calibration
        quantize_one(model, layer, cfg, m2, gram) -> LayerReport, swapping the layer in place
        (physkern.api._quantize_one).
        """
        owners = self.owners([l.out_features * l.in_features for l, _ in here])
        reports: list = [None] * len(here)
        for j, ((layer, cfg), owner) in enumerate(zip(here, owners)):
            if owner == self.rank:
                m2, gram = stats.take(layer.name) if stats is not None else (None, None)
                reports[j] = quantize_one(model, layer, cfg, m2, gram)
                del m2, gram
        if self.world == 1:
            return reports
        from .layers import QuantizedLinear
        from .linear import replace_layer
        for j, ((layer, _), owner) in enumerate(zip(here, owners)):
            payload = None
            if owner == self.rank:
                q = model.get_submodule(layer.name)
                payload = (reports[j], q.layer_meta(),
                           {k: v.detach().cpu() for k, v in q.state_dict().items()})
            payload = self.broadcast(payload, src=owner)
            if owner != self.rank:
                rep, meta, tensors = payload
                device = layer.weight().device
                with torch.device("meta"):
                    q = QuantizedLinear.empty(meta)
                q.load_state_dict({k: v.to(device) for k, v in tensors.items()}, assign=True)
                replace_layer(model, layer.name, q)
                reports[j] = rep
        return reports


def init_from_env(device: str = "cpu") -> tuple[Dist, str]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT in the environment); returns (Dist, this rank's device). Without WORLD_SIZE > 1
    it does nothing: (Dist(0, 1), device). CUDA devices: rank r uses cuda:LOCAL_RANK and nccl;
    CPU: gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as td
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist.current(), device


def shutdown() -> None:
    """Leave the process group (if any)."""
    import torch.distributed as td
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()

