"""Torch-free helpers every stage and CLI shares: user errors and exit codes, atomic writes."""
