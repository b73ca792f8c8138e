"""Tests of ``distill``."""
