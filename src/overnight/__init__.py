"""overnight: autonomous research loops you can trust while you sleep."""

__version__ = "0.1.0"
