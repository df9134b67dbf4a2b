"""Mamba2 selective-state-space scan: chunked (SSD) prefill/training scan and one-step decode."""

from pallas_kernels.mamba2.ops import chunk_scan, state_update

__all__ = ["chunk_scan", "state_update"]
