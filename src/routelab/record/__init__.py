"""Recording every routing decision of a run.

:mod:`.batch` (the per-batch context the recorders share, the :class:`Recorder` protocol, a run's
:class:`Recording`), :mod:`.routing_log` (``routing.parquet`` and the running counts),
:mod:`.decisions` (``decisions.parquet``, the sampled detail), :mod:`.statistics` (summary.json
from the counts) and :mod:`.json_logs` (the sample as JSON routing logs).
"""

from routelab.record.batch import BatchContext, Recorder, Recording
from routelab.record.decisions import DecisionSampler
from routelab.record.routing_log import RoutingRecorder
from routelab.record.statistics import merge_states, routing_summary, summary_from_state

__all__ = ["BatchContext", "DecisionSampler", "Recorder", "Recording", "RoutingRecorder", "merge_states",
           "routing_summary", "summary_from_state"]
