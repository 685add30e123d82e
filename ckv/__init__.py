"""ckv: a strongly consistent key-value store built on chain replication."""

__version__ = "0.1.0"
