"""Experiments on the digits miniature, as library code: the grid driver (:mod:`.grid`), the
size arithmetic next to DiT-XL/2's (:mod:`.arithmetic`), the claim checker (:mod:`.claims`) and
the report rendered from the runs' files (:mod:`.report`). ``scripts/grid.py`` is their command."""
