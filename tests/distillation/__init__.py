"""Tests of distill_lab.distillation, one module per module (a package: tests/test_data.py exists too)."""
