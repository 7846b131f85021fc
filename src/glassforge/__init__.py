"""glassforge: open data to a served chat model, with every step public and checkable."""

__version__ = "0.1.0"
