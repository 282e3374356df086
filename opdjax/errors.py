"""The errors a user fixes by changing the command line, the config or an input file.

`python -m opdjax.train` prints these as one `error: ...` line; any other exception is a
bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A setting, data file or checkpoint that cannot work; raised before anything compiles."""
