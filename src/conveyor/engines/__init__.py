"""Engines: what executes tasks (``local`` embedded workers; ``celery`` later)."""
