"""Tests of one module or subpackage at a time, in a folder named after ofe/<subpackage>/."""
