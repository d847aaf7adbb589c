"""`python -m storage ...` runs the `storage` command line (used by the local launcher)."""

from storage.cli import main
from storage.daemons import controller_command, local_group, node_command

for command in (node_command, controller_command, local_group):
    if command.name not in main.commands:
        main.add_command(command)
main()
