"""Error types shown to users without a traceback.

Every error a user can fix (bad config, bad data, a missing optional package) derives from
`QwenFtError`; the CLI prints its message and exits 1 instead of dumping a traceback.
"""

from __future__ import annotations


class QwenFtError(Exception):
    """A problem the user can fix; its message says what, where and how."""

    prefix = "error"  # the CLI prints "{prefix}: {message}" and exits with `exit_code`
    exit_code = 1


class ConfigError(QwenFtError):
    """One or more config problems, collected and raised together."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


class DataError(QwenFtError):
    """Bad rows in the training data (file:line, field, fix)."""


class MissingDependency(QwenFtError):
    """An optional package needed by the requested feature is not installed."""


class Preempted(QwenFtError):
    """The run was asked to stop (SIGTERM, SIGUSR1, SIGINT) and did, after saving a checkpoint to resume from."""

    prefix = "stopped"
    exit_code = 75  # EX_TEMPFAIL: not a failure of the run, try again (a scheduler may requeue on it)


class RankLost(QwenFtError):
    """Another process of a multi-process run died or hangs; the message names its rank and the checkpoint
    to resume from."""
