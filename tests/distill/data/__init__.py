"""Tests of ``distill.data``."""
