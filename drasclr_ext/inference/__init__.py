"""Cohort inference: one model load, per-subject outputs, failures recorded without stopping the cohort."""
