"""Formats and transports: data-set files, wire protocol, alarm journal, simulator."""
