"""`ConfigError`, the one refusal of every configuration parser.

Its own module because config.py imports the parsers that raise it (pools.py); everyone else
imports it as `from gol7lb.config import ConfigError`.
"""


class ConfigError(Exception):
    """A setting that stops the start; str() is the one line shown to the operator."""
