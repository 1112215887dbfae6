"""Command-line entry points; the files in tools/ are thin wrappers around these."""
