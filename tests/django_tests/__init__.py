"""Tests of the Django integration, with a small project of their own (settings in conftest)."""
