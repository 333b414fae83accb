"""`python -m spinctl` runs the same CLI as the `spinctl` script."""

from .cli import main

main()
