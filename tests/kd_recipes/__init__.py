"""Tests of ``kd_recipes``."""
