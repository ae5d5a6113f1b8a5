"""Command line: ``regstream serve | t24-sim | watch | process | users``."""
