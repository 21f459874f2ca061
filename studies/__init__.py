"""Research studies of the shipped memorizer (not part of the harden package): `python -m studies.<name> --help`.

Each answers one question about the model organism with measurements (docs/memorizer.md records them); they import
harden like any user would.
"""
