"""Tests of ofe/cluster/."""
