"""Tests of ofe/core/."""
