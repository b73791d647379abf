"""`python -m overnight`."""

from overnight.cli import main

main()
