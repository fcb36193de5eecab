"""The end of the pipeline: the packed format (``packed.py``), the diffusers folder
(``diffusers.py``), and ``open_model`` (``open.py``) for every model file kind."""
