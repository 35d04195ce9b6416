"""RealisID."""
