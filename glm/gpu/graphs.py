"""CUDA graphs of the decode forward, one per batch bucket (1, 2, 4, 8 rows).

A step of n rows replays the graph of the smallest bucket >= n: its ~250 kernel launches cost one
graph launch instead of one Python launcher call each. Every input of a graph is a view of the
runner's staging buffer (glm/staging.py), whose address never changes, and its output (the logits)
is a static tensor of the graph's memory pool, read before the next replay. Rows past n repeat row 0
(glm.staging.padded): they compute row 0's token at row 0's slot again, so they write the same k, v bits there,
and their logits are dropped. Rows never depend on each other, so row 0's result is unchanged.

Captured at setup, after the eager warm-up has compiled every kernel at these shapes, and only where
torch can use CUDA; `capture` replays each graph against the eager forward on the same inputs and
keeps the graphs only if every output is bitwise equal (else one log line, and decode stays eager).
"""
from __future__ import annotations

import torch

from ..staging import BUCKETS, StepStaging, staged

class DecodeGraphs:
    """The graphs of one model's decode forward over one staging buffer, by bucket."""

    def __init__(self):
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def get(self, rows: int):
        return self.graphs.get(rows)

    def replay(self, rows: int) -> torch.Tensor:
        """Run bucket `rows`'s graph on the staged inputs; its logits [rows, 1, vocab]."""
        graph, logits = self.graphs[rows]
        graph.replay()
        return logits

    def capture(self, forward, staging: StepStaging, buckets=BUCKETS) -> str | None:
        """Capture forward(inputs) -> logits for each bucket, largest first (smaller graphs reuse
        its memory pool); the staging buffer must hold valid rows for the largest bucket. Returns
        None when every graph replays bitwise equal to the eager forward, else what failed (and
        keeps no graph)."""
        if not torch.cuda.is_available() or staging.device_buffer.device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        try:
            pool = torch.cuda.graph_pool_handle()
            for rows in sorted(buckets, reverse=True):
                inputs = staging.inputs(rows)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), staged(inputs):
                    forward(inputs)  # warm-up on a side stream, as torch's capture needs
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), staged(inputs):
                    logits = forward(inputs)
                self.graphs[rows] = (graph, logits)
            return self.check(forward, staging)
        except Exception as e:  # noqa: BLE001 - any capture failure means: decode eagerly
            self.graphs.clear()
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]

    def check(self, forward, staging: StepStaging) -> str | None:
        """Each graph's logits against the eager forward's on the same staged inputs, bit for bit."""
        for rows in sorted(self.graphs):
            with staged(staging.inputs(rows)) as inputs:
                want = forward(inputs).clone()
            got = self.replay(rows).clone()
            if not torch.equal(got, want):
                self.graphs.clear()
                return f"the {rows}-row graph's logits differ from the eager step's"
        return None
