"""Tests of ofe/train/."""
