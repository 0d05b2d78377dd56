"""keygate end-to-end suite: a package so its modules import one another
(and `scripts`) from the repository root without sys.path edits."""
