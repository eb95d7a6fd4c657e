"""Reading an experiment: layer similarity, statistics and plots. Nothing here writes a store.

- ``cka``      linear CKA (numpy references, and out of core over a store with dask: ``store_cka``, ``run_cka``)
- ``stats``    Welch t-tests, bootstrap CIs and Holm correction of variants against a baseline (``compare``)
- ``paired``   paired t-test by seed, McNemar per seed and pooled, paired bootstrap over items (``compare_paired``)
- ``curves``   learning curves, per-layer K/V cosine, accuracy bars
- ``heatmap``  CKA matrices and layer maps as heatmaps
- ``notebooks/cka_inspection.ipynb``  a store opened with dask and xarray, CKA recomputed out of core

Import the submodule you need; none is imported here, so ``import kava.analysis`` stays cheap.
"""
