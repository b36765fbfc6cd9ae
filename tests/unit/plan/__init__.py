"""Tests of ofe/plan/."""
