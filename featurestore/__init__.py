"""Feature store: frozen encoders and the Zarr v3 token store (schema, writer, reader)."""
