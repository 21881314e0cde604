"""`python -m ce_audit` runs the command line."""

from ce_audit.cli import main

main()
