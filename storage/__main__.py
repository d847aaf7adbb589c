"""`python -m storage ...` runs the `storage` command line (used by the local launcher)."""

from storage.cli import main

main()
