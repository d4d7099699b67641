"""Pruning: STP's PCA channel significance (:mod:`.pca`), structured channel surgery
(:mod:`.surgery`), gradual temporal pruning (:mod:`.temporal`) and their recipe stages
(:mod:`.stp`: ``prune_pca``, ``temporal``, ``quant_sweep``)."""
