"""Tests for evomerge.merge: the contract every method keeps, hand-computed numerics, and checks."""
