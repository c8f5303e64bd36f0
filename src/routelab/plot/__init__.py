"""The plot_run stage: the per-run figures (:mod:`.drawing`) and a run's figure set with its index
(:mod:`.run_figures`)."""
