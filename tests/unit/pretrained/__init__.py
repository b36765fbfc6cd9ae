"""Tests of ofe/pretrained/."""
