"""validation: attribution methods, metrics, meta-evaluation and reports."""
