"""Helpers for the transfer-learning workbook: models, data, training, plots."""

__version__ = "0.1.0"
