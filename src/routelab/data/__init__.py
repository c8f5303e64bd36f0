"""The prepare_dataset stage: loading datasets (:mod:`.loading`), lm-evaluation-harness windows and
counts (:mod:`.windows`), and the prepared layout on disk (:mod:`.prepare`)."""
