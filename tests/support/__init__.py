"""Test helpers that are more than a fixture: corpora and builders shared by test modules."""
