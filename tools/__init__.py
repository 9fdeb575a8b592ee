"""Command-line tools. Each reports bad input as one ``tessera: error: ...`` line with exit code 2
(`train.cli_errors`), re-exported here for the tools."""

from train.cli_errors import BAD_INPUT, ToolParser, report_error

__all__ = ["BAD_INPUT", "ToolParser", "report_error"]
