"""Studies on the digits miniature: the lab notebook beside the library (see studies/README.md)."""
