"""Experiments shipped with opdjax: one module each, with `get_config(arg)` and optionally
`main(config, workdir)`. `python -m opdjax.train --list` shows them; `--exp NAME` runs one,
and `--exp path/to/my_exp.py` runs a file of your own with the same two functions."""
