"""Files the pipeline writes: atomic output (:mod:`.files`), the Parquet writer (:mod:`.parquet`) and
the host memory the recorders keep batches in until it writes them (:mod:`.arena`)."""
