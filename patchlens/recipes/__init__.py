"""Recipes: experiments built as variants for the patching engine."""
