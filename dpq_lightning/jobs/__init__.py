"""The jobs: what the commands run, end to end, and the only modules besides ``config.py`` and the
experiment drivers that see a whole :class:`~dpq_lightning.config.RunConfig`.

* :mod:`.run` - ``train.py``'s main job: teacher -> stage 1 (once) -> calibration -> export;
* :mod:`.stage1` - stage 1 as a job, once per output folder (also ``dpq quantize`` and ``dpq plan``);
* :mod:`.export` - the end of a run: packed file, final evaluation, ``summary.json``;
* :mod:`.fingerprint` - a hash of the student's state per rank, to compare runs.
"""
