"""Attention blocks the fusion models are built from (each documented in docs/)."""
