"""The built-in demo: a synthetic multi-domain corpus (:mod:`.corpus`) and the tiny MoE the
train_demo_model stage trains on it (:mod:`.model`)."""
