"""Distillation: stream a store's shards into a student trainer, and evaluate what it learned. Never runs a teacher.

- ``trainer``       the training recipe (``run_distill``): setup, the loop, checkpoints, outputs
- ``loader``, ``plan``  the streaming loader and its per-epoch plan from the store's metadata
- ``objective``, ``losses``, ``projectors``, ``fusion``  the K/V objective: per-token loss terms, head/dim
  projectors, multi-teacher fusion
- ``student``, ``checkpoint``, ``ddp``  the student model, exact-resume checkpoints, torchrun
- ``evaluate``      `kava eval`: batched greedy generation, answer extraction, reference NLL
- ``config``        ``DistillConfig``, the options of `kava distill`
"""
