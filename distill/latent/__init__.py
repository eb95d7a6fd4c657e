"""Latent reasoning distilled from a compressed CoT cache (KaVa, Kuzina et al. 2025): one model in two modes.

Teacher mode reads question · CoT · answer; its per-layer, per-head CoT K/V, compressed by R-KV to ``M`` rows, is
the target of the student mode, which reads the question, ``M`` continuous latent tokens refined by ``T`` Jacobi
iterations (PCCoT), then the answer.

- ``model``      ``LatentReasoner``: the latents, the Jacobi iterations, the projection, teacher-forced answers and
  greedy generation
- ``losses``     the objective's terms as tensor functions, and the on-the-fly R-KV compression
- ``objective``  one batch's loss in self-distillation (teacher mode and student mode of the same model)
- ``data``       ``LatentRow``s (the chain task, GSM8K) and their batches in both layouts
- ``config``     ``LatentConfig``, the options of `kava latent`
- ``train``      the recipe (``train_latent``), saving and loading a latent student
- ``evaluate``   accuracy, reference answer NLL, tokens generated and seconds per problem

``kava --help`` imports ``config`` only; the other modules import torch and transformers.
"""
