"""The layout of a chunk of steps, as the feeder writes it and the two loops read it.

A chunk of ``steps`` steps for ``slots`` rows is two int64 arrays:
- ``ids``  [steps, slots, T]: per row a segment's T token ids (``[CLS] mem [SEP] text [SEP] [PAD]...``);
- ``meta`` [steps, FIELDS, slots]: per step one vector per field below, so a step's key lengths,
  result rows or slots are each one contiguous [slots] vector (no copy before a kernel reads them).
  int64 because every reader takes int64: ``memory_write``'s slots, the attention's key lengths
  and ``index_copy_``'s result rows.

A step's busy rows come first; only its first ``width`` rows run (see schedule.py).
"""
KEY_LEN = 0      # keys the row attends to: M + 3 + its text tokens
DEST = 1         # the result row its logits go to (a sink row unless it is its document's last segment)
BUSY = 2         # 1 if the row holds a segment, 0 for an idle row
RESET = 3        # 1 if the row starts a document: its memory starts from the initial memory
SLOT = 4         # the memory-state row it reads and writes; -1 for an idle row
DOC = 5          # the index of its document (a start memory or a final memory is per document); -1 idle
FIELDS = 6
