"""``python -m skipfast.bench``: eager reference vs skipfast, side by side."""
