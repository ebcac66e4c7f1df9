"""Which machine holds which layers of a model split over workers (``--rpc``), and whether each
has the memory for them, decided from the GGUF's header and what each worker says it has free,
before any weight is sent.

llama.cpp puts the last ``n_gpu_layers`` layers on its devices (the workers come first in its
list), split among them in proportion to their free memory; the first layers, the token
embeddings and the output stay on this machine. localmed gives this machine a share of the layers
in proportion to its own free memory, as the workers have theirs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from localmed.planner import (
    RAM_OVERHEAD,
    VRAM_HEADROOM,
    Hardware,
    ModelFootprint,
    OffloadPlan,
    gib,
)

LOCAL = "this machine"


@dataclass(frozen=True)
class Share:
    machine: str
    layers: int
    needed: int
    free: int

    @property
    def fits(self) -> bool:
        return self.needed <= self.free

    def line(self) -> str:
        return (f"{self.machine}: {self.layers} layers, {gib(self.needed)} of "
                f"{gib(self.free)} free")


def plan_split(model: ModelFootprint, hw: Hardware, workers: list[tuple[str, int]], *,
               n_ctx: int, remote_layers: int | None = None
               ) -> tuple[OffloadPlan, tuple[Share, ...]]:
    """The plan (``gpu_layers``: the workers' layers) and each machine's share; ``workers``:
    (name, free bytes) each. ``remote_layers`` (``--gpu-layers``) overrides the proportion."""
    n = model.n_layers
    kv_per_layer = model.kv_bytes(n_ctx) // max(1, n)
    cost = [b + kv_per_layer for b in model.layer_bytes]
    usable = [max(0, int(free * (1 - VRAM_HEADROOM))) for _, free in workers]
    if remote_layers is None:
        pool = hw.ram_available + sum(usable)
        remote_layers = round(n * sum(usable) / pool) if pool else 0
    k = n if remote_layers < 0 else min(remote_layers, n)
    # llama.cpp's split of layers n-k..n-1 among its devices, by cumulative free memory
    total = sum(usable) or 1
    bounds, running = [], 0
    for free in usable:
        running += free
        bounds.append(running / total)
    held = [0] * len(workers)
    bytes_held = [0] * len(workers)
    for j in range(k):
        device = min(bisect.bisect_right(bounds, j / k), len(workers) - 1)
        held[device] += 1
        bytes_held[device] += cost[n - k + j]
    local_bytes = (model.weights_bytes + model.kv_bytes(n_ctx) + RAM_OVERHEAD
                   - sum(bytes_held))
    shares = (Share(LOCAL, n - k, local_bytes, hw.ram_available),
              *(Share(f"worker {name}", layers, need, free)
                for (name, free), layers, need in zip(workers, held, bytes_held, strict=True)))
    reasons = (*(s.line() for s in shares),
               f"weights {gib(model.weights_bytes)}, KV cache {gib(model.kv_bytes(n_ctx))} "
               f"for {n_ctx} tokens of context")
    short = [s for s in shares if not s.fits]
    if short:
        reasons += (f"{short[0].machine} would hold {short[0].layers} layers "
                    f"({gib(short[0].needed)}) with {gib(short[0].free)} free",)
    plan = OffloadPlan(k, n, n_ctx, "rpc", local_bytes, sum(bytes_held), not short, reasons)
    return plan, shares
