"""Cohort analysis (`analysis`), clinician reports (`patient`), their statistics, plots and templates."""
