"""Tests of ``distill.offline``."""
