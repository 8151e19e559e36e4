"""Architecture-only modules (no training infrastructure)."""
