"""Running the model: the route stage (:mod:`.route`) with its evaluation (:mod:`.evaluate`), quality
metrics (:mod:`.quality`), resume and retries (:mod:`.resume`), shards (:mod:`.shards`) and the run's
records (:mod:`.records`); and the calibration stages (:mod:`.calibration`).

Light at import (the Snakefile imports :mod:`.resume` and :mod:`.shards`).
"""
