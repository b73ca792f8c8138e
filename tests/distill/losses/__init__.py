"""Tests of ``distill.losses``."""
