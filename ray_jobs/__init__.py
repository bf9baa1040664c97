"""Distributed entry points (prep, pre-train, fine-tune sweep, report) and the ``ctssl`` CLI."""
