"""Small- vs large-batch studies: a Ray Tune grid of Ray Train fits, each recorded by the
:class:`~dynatrack.PatternRecorder`, and their comparison (``dynatrack sweep`` / ``dynatrack compare``)."""
