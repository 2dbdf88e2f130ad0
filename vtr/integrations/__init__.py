"""Integrations with evaluation and serving frameworks (imported only when those frameworks load them)."""
