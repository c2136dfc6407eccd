"""mlxpt's Textual terminal UI (issue 7): a client of the `mlxpt` library and of run processes.

The library never imports this package."""
