"""Snapshots, copy-on-write views, namespaces and process execution."""
