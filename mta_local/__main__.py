"""Allow ``python -m mta_local``."""

from .cli import cli

cli(prog_name="mta-local")
