"""Tests of ofe/config/."""
