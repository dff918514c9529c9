"""Automatic checks for the notebooks' exercises; one module per lesson, references kept here, not in the notebooks."""
