"""Triton kernels for rmt_fast, installed as ``rmt_fast.kernels`` (see docs/KERNELS.md).

``rmt_fast.kernels.attention``: fused attention over the memory-plus-segment block. Importing this
package imports nothing else, so it never needs triton or a GPU.
"""
