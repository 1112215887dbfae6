"""Experiments that train several stages and compare them (the paper's ablations)."""
