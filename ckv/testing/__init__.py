"""Test support for ckv: history recording and consistency checking (no Twisted needed)."""
