"""The dashboard: `python -m launch.dashboard --config.results=DIR` (Streamlit on http://HOST:PORT).

  python -m launch.dashboard --config.results=~/.cache/neurodiff_jax/demo     # launch.demo's results root
  python -m launch.dashboard --config.results=DIR --config.port=8600 --config.host=0.0.0.0
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Where the results are and where the server listens."""
  del arg
  c = ml_collections.ConfigDict()
  # A results root: launch.demo's, or any directory of launch.train / analyze / diff outputs
  # ("" = launch.demo's default root, $NEURODIFF_HOME/demo/default).
  c.results = ""
  c.port = 8501  # the port Streamlit listens on
  c.host = "127.0.0.1"  # the address it binds (0.0.0.0 to reach it from another machine)
  c.model_mesh = ()  # (data, model) mesh the Live page loads the pair onto: () = one device; (1, 8) = weights / 8
  c.check_only = False  # check the results and the port, print the command, and exit without serving
  c.lock()
  return c
