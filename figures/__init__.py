"""Figures built from stored results, theory drawn over measurement."""
