"""Stand-in of Forge 2's ``backend`` package (see ../README.md)."""
