"""Analyses of models and crosscoders: residual statistics, Δnorm, latent scaling, ADL."""
