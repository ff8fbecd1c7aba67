"""mtpkit: distill, export and run Gemma-style multi-token-prediction drafters."""

__version__ = "0.1.0"
