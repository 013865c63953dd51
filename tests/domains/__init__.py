"""Tests of the domain packages."""
