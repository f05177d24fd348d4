"""Data files bundled with minnorm-audit (read them with :func:`minnorm_audit.data.load_bundled_digits`)."""
