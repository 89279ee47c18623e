"""Export to and import from other ecosystems' formats."""
