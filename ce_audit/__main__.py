"""`python -m ce_audit` and the `ce-audit` command: the garbage collector paused for the start-up
(ce_audit.collector), then the command line."""

from ce_audit import collector


def command_line() -> None:
    """The command-line process: ``ce_audit.cli.command_line`` imported and run with the collector paused;
    each command resumes it once its start-up is over."""
    collector.pause()
    from ce_audit.cli import command_line as run

    run()


if __name__ == "__main__":  # a spawned worker process imports this module again: it must not run
    command_line()
