"""Converters: pure functions from a source model's state dict and config to patchlens'."""
