"""`python -m spinctl` runs the same CLI as the `spinctl` script."""

from spinctl.cli import main

main()
