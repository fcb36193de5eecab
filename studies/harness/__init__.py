"""The harness of the studies on the digits miniature: it runs lists of configs through
``train.py``'s path (:mod:`.runner`), and renders the results pages from the runs' records.

The lists: the scheme x bits grid (:mod:`.grid`), the calibration recipes (:mod:`.recipes`), the
teacher-paired re-decision (:mod:`.redecide`); the noise-aware rule (:mod:`.noise`), the claim
checkers (:mod:`.claims`, :mod:`.paired_claims`), the reports (:mod:`.report`,
:mod:`.recipe_report`, :mod:`.paired_report`), the per-layer sensitivity behind the bit allocation
(:mod:`.sensitivity`), the error attribution (:mod:`.attribution`) and the re-evaluation of old runs
(:mod:`.reevaluate`). Their commands are ``studies/scripts/*.py``. The library
(``dpq_lightning``) never imports this package.
"""
