"""Tests of ``distill.evaluation``."""
