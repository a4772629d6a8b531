"""The one-command demo: the whole pipeline on the model organisms and the story report it writes."""

from neurodiff_jax.demo.pipeline import STAGES, results_root, run_demo

__all__ = ["STAGES", "results_root", "run_demo"]
