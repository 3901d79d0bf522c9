"""Command-line tools (`python -m preflmr_jax.tools.<name>`)."""
