"""The protocol edges of pdp: each adapter turns its protocol into a ``CheckRequest`` and renders the ``Decision``."""
