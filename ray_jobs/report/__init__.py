"""The study report, built from MLflow runs alone: tables, plots, paired tests, minimal label counts."""
