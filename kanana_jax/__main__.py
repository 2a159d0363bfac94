"""`python -m kanana_jax ...` is the `kanana-jax` command."""
from kanana_jax.cli import main

main()
