"""Screens of the mlxpt TUI, one per file."""
