"""Temporal workflows. Their ids and search attributes are named in `upsertflow.naming`."""
