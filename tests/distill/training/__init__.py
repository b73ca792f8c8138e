"""Tests of ``distill.training``."""
