"""The decorator the tests' jaxtyping import hook checks annotations with: beartype with the PEP 484 numeric tower.

`float` accepts an `int` (and `complex` a `float`), as PEP 484 says and as callers write (`pct(12, 40)`).
"""

from beartype import BeartypeConf, beartype

check = beartype(conf=BeartypeConf(is_pep484_tower=True))
