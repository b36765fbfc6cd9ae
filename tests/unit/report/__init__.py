"""Tests of ofe/report/."""
