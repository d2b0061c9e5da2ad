"""Distributed explanation: dataset readers, Ray actors and the Zarr store."""
