"""A Django task backend (placeholder)."""
