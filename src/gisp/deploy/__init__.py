"""Deploy many: every level of a run as a smaller model (export), or all of them in one (elastic)."""
