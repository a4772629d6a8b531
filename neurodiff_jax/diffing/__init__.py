"""Activation-difference methods: read h_ft − h_base directly (ADL, KL, norms, PCA, SAE, patching, weights)."""
