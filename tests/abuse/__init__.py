"""Abuse tests: each finding of the hostile-client review, tried against a real running server."""
