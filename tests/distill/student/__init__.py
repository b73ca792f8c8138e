"""Tests of ``distill.student``."""
