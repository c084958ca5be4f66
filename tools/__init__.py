"""The embedded demo (data, runner, summaries) and the launchers' shell library."""
