"""The ``custom_dataset: !function demo_tasks.<name>`` hooks of this folder's task YAMLs.

lm-eval calls a hook with the task's whole ``metadata`` (the YAML's, then the TaskManager's on top)
as keyword arguments, so each hook takes the keys its documents depend on and ignores the rest.
"""

from routelab.demo import tasks


def cloze_choice(seed, documents, **metadata):
    return tasks.cloze_choice(seed=seed, documents=documents)


def close_brackets(seed, documents, **metadata):
    return tasks.close_brackets(seed=seed, documents=documents)


def bracket_choice(seed, documents, **metadata):
    return tasks.bracket_choice(seed=seed, documents=documents)
