"""Tests of ofe/aggregate/."""
