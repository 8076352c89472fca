"""Tests of lazyxform/ops/ (a package: tests/recipes has test files of the same names)."""
