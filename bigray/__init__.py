"""bigray: prepare, train, tune and serve large language models on Ray."""

__version__ = "0.1.0"
