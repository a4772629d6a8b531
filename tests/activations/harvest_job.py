"""Runs one harvest from a JSON config file, for the crash and multi-process tests: `harvest_job.py CONFIG.json`."""

import json
import sys

import ml_collections

from neurodiff_jax.activations.harvest import harvest

if __name__ == "__main__":
  harvest(ml_collections.ConfigDict(json.loads(open(sys.argv[1]).read())))
