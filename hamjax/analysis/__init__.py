"""Diagnostics of trained runs (e.g. why CAAT's router routes as it does); no training code
imports this package."""
