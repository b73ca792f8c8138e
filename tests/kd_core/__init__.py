"""Tests of ``kd_core``."""
