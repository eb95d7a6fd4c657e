"""Extraction: run each teacher once over a reasoning dataset and fill the store with its aligned K/V (and Q).

- ``recipe``        the extraction loop (``run_extract``): grid, teacher, layer map, one pass per batch, shards
- ``teachers``      the teacher registry (presets); loading itself is ``kava.core.models``
- ``rows``, ``data``, ``synthetic``  reasoning rows: their types, files and the hub, the seeded generator
- ``templates``, ``vocab``, ``grid``  formatting rows into segments, small trained tokenizers, the student grid
- ``capture``, ``rope``  Q/K/V as attention sees them, pre-RoPE keys by the exact inverse rotation
- ``align``, ``warp``  teacher tokens onto student tokens (character IoU), segment-wise time warping
- ``layer_map``, ``cka``, ``calibrate``  which teacher layers each student layer learns from
- ``teacher_pass``  one batch through the teacher; ``estimate`` store size and time before a run
- ``evict``, ``prefill``  compressed teachers: the eviction rules, and chunk-by-chunk passes under a bounded cache
- ``config``        ``ExtractConfig``, the options of `kava extract`

Distillation reuses ``capture``, ``rope`` and ``grid`` on purpose; nothing here trains a model.
"""
