"""Tests of lazyxform/recipes/ (a package: tests/ops has test files of the same names)."""
