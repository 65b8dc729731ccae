"""The `lhtstream` command: argument parsing (`parser`) and every subcommand's handler."""

from lhtstream.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
