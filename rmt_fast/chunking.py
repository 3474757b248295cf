"""How many steps the Engine lays out and copies at a time, and how many such chunks are in flight.

A module of its own (no imports) so that the Engine's loop (``engine.runner``) and the memory model that
sizes its buffers (``perfmodel.estimate``) read the same numbers without importing each other.
"""
STEPS_PER_CHUNK = 64          # steps laid out and copied at a time (fewer for wide batches)
RING = 3                      # chunk buffers in flight: one computing, one copied, one being laid out


def steps_per_chunk(slots: int) -> int:
    """About 512 segment rows per chunk (256 KiB of ids at T = 512), at least 8 steps."""
    return max(8, min(STEPS_PER_CHUNK, 512 // slots))
