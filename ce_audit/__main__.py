"""`python -m ce_audit` runs the command line."""

from ce_audit.cli import command_line

if __name__ == "__main__":  # a spawned worker process imports this module again: it must not run
    command_line()
