"""The demo's downstream tasks: documents from the eval split that say what the task asks, and
config/tasks/ YAMLs that lm-eval finds, loads offline and scores document for document."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from routelab.demo import corpus as demo_corpus
from routelab.demo import tasks
from tests.support import REPO
from tests.support.route_setup import SETTINGS

TASKS_DIR = REPO / "config" / "tasks"
PASSAGE = ("anna found an old lamp in the attic . the lamp was red . the dog finds a kettle . "
           "anna showed the lamp to ben . at the end of the day , ben gave anna back the lamp")
CLOSERS = {"(": ")", "[": "]", "{": "}"}


def test_cloze_choice_document_hides_the_last_word_among_objects_the_passage_never_names():
    for stream in range(50):
        document = tasks.cloze_choice_document(PASSAGE, np.random.default_rng(stream))
        assert document["context"] == PASSAGE.removesuffix(" lamp")
        assert len(document["choices"]) == len(set(document["choices"])) == 4
        assert document["choices"][document["gold"]] == "lamp"
        distractors = set(document["choices"]) - {"lamp"}
        assert distractors <= set(demo_corpus.OBJECTS) - {"lamp", "kettle"}


def test_cloze_choice_places_the_answer_uniformly():
    golds = collections.Counter(tasks.cloze_choice(seed=0, documents=400)["test"]["gold"])
    # Binomial(400, 1/4): 100 ± 8.7, so each position lands in 70..130 unless the placement is biased.
    assert sorted(golds) == [0, 1, 2, 3] and all(70 <= count <= 130 for count in golds.values()), golds


def test_cloze_choice_is_built_from_the_eval_split():
    documents = tasks.cloze_choice(seed=2, documents=30)["test"]
    passages = demo_corpus.generate("cloze", "eval", 30, seed=2)
    assert documents["context"] == [passage.rpartition(" ")[0] for passage in passages]
    assert [choices[gold] for choices, gold in zip(documents["choices"], documents["gold"])] == [
        passage.rpartition(" ")[2] for passage in passages]
    train = {passage.rpartition(" ")[0] for passage in demo_corpus.generate("cloze", "train", 30, seed=2)}
    assert not train & set(documents["context"])


@pytest.mark.parametrize("text, expected", [
    ("def f ( x ) : return ( [ x , y ] ) ;", {"context": "def f ( x ) : return ( [ x , y", "target": " ] )"}),
    ("def g ( n ) : return { n } ; def f ( x ) : return { ( 3 ) , [ x ] } ;",
     {"context": "def g ( n ) : return { n } ; def f ( x ) : return { ( 3 ) , [ x", "target": " ] }"}),
    ("def f ( x ) : return [ x ] ; def g ( n ) : return n ;", None),
])
def test_close_brackets_document_cuts_before_the_last_brackets(text, expected):
    assert tasks.close_brackets_document(text) == expected


def unclosed_brackets(code_line: str) -> str:
    """The closers the open brackets of ``code_line`` still need, innermost first, spaced as the corpus."""
    stack = []
    for word in code_line.split():
        if word in CLOSERS:
            stack.append(word)
        elif word in CLOSERS.values():
            assert CLOSERS[stack.pop()] == word
    return "".join(f" {CLOSERS[opener]}" for opener in reversed(stack))


def test_close_brackets_target_closes_every_open_bracket_of_an_eval_document():
    documents = tasks.close_brackets(seed=1, documents=40)["test"]
    for row in documents:
        (text,) = demo_corpus.generate("code", "eval", 1, seed=1, start=row["corpus_index"])
        assert f"{row['context']}{row['target']} ;" == text
        assert row["target"] == unclosed_brackets(row["context"].rpartition(" ; ")[2])
    # The documents skipped in between are exactly those whose last expression ends in no bracket.
    last = documents["corpus_index"][-1]
    skipped = set(range(last + 1)) - set(documents["corpus_index"])
    assert skipped and all(demo_corpus.generate("code", "eval", 1, seed=1, start=i)[0].split()[-2] not in
                           CLOSERS.values() for i in skipped)


def test_bracket_choice_document_hides_the_closers_among_other_sequences_of_as_many():
    row = {**tasks.close_brackets_document("def f ( x ) : return ( [ x , y ] ) ;"), "corpus_index": 7}
    # By hand: the eight other two-closer sequences of ( [ {.
    others = {") )", ") ]", ") }", "] ]", "] }", "} )", "} ]", "} }"}
    golds = set()
    for stream in range(50):
        document = tasks.bracket_choice_document(row, np.random.default_rng(stream))
        assert document["context"] == "def f ( x ) : return ( [ x , y" and document["corpus_index"] == 7
        assert len(document["choices"]) == len(set(document["choices"])) == 4
        assert document["choices"][document["gold"]] == "] )"
        assert set(document["choices"]) - {"] )"} <= others
        golds.add(document["gold"])
    assert golds == {0, 1, 2, 3}


def test_bracket_choice_distractors_differ_from_the_answer_and_close_as_many():
    documents = tasks.bracket_choice(seed=1, documents=200)["test"]
    closers = {close for _, close in demo_corpus.BRACKETS}
    for document in documents:
        answer = document["choices"][document["gold"]]
        assert len(set(document["choices"])) == 4
        assert all(len(choice.split()) == len(answer.split()) >= 2 for choice in document["choices"])
        assert all(set(choice.split()) <= closers for choice in document["choices"])
    golds = collections.Counter(documents["gold"])
    # Binomial(200, 1/4): 50 ± 6.1, so each position lands in 30..70 unless the placement is biased.
    assert sorted(golds) == [0, 1, 2, 3] and all(30 <= count <= 70 for count in golds.values()), golds


def test_bracket_choice_asks_the_close_brackets_questions_that_close_two_or_more():
    rows = tasks.close_brackets(seed=1, documents=60)["test"].to_list()
    documents = tasks.bracket_choice(seed=1, documents=30)["test"].to_list()
    kept = [row for row in rows if len(row["target"].split()) >= 2][:30]
    assert len(kept) == 30 and len(kept) < len(rows)  # some questions close a single bracket
    assert [(d["corpus_index"], d["context"], " " + d["choices"][d["gold"]]) for d in documents] == [
        (row["corpus_index"], row["context"], row["target"]) for row in kept]


@pytest.mark.parametrize("build", [tasks.cloze_choice, tasks.close_brackets, tasks.bracket_choice])
def test_task_documents_are_deterministic_and_a_prefix_of_longer_sets(build):
    documents = build(seed=0, documents=20)["test"].to_list()
    assert documents == build(seed=0, documents=20)["test"].to_list()
    assert build(seed=0, documents=8)["test"].to_list() == documents[:8]
    assert build(seed=1, documents=20)["test"].to_list() != documents


@pytest.mark.parametrize("build", [tasks.cloze_choice, tasks.close_brackets, tasks.bracket_choice])
def test_bad_task_arguments_are_named(build):
    with pytest.raises(ValueError, match="documents: 0 is not valid"):
        build(seed=0, documents=0)
    with pytest.raises(ValueError, match="seed: '1' is not valid"):
        build(seed="1", documents=4)


# -- the YAMLs under lm-eval -------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """No hub access: the variables for any process, the parsed flags for libraries already imported."""
    import datasets
    import huggingface_hub

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def untrained_demo_lm():
    """lm-eval's HFLM around an untrained demo-architecture MoE and a BPE tokenizer of the demo corpus."""
    from lm_eval.models.huggingface import HFLM

    from routelab.demo.model import build_model, train_tokenizer

    tokenizer = train_tokenizer(demo_corpus.training_corpus(200, seed=1), vocab_size=300)
    model = build_model({**SETTINGS, "max_positions": 128}, tokenizer, seed=0).eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)


def task_manager(**metadata):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata or None)


def test_lm_eval_finds_the_demo_tasks_with_the_yaml_defaults(offline):
    manager = task_manager()
    assert {"demo_cloze_choice", "demo_close_brackets", "demo_bracket_choice"} <= set(manager.all_tasks)
    loaded = manager.load(["demo_cloze_choice", "demo_close_brackets", "demo_bracket_choice"])["tasks"]
    assert len(list(loaded["demo_cloze_choice"].test_docs())) == 40
    assert list(loaded["demo_close_brackets"].test_docs()) == tasks.close_brackets(0, 40)["test"].to_list()
    assert list(loaded["demo_bracket_choice"].test_docs()) == tasks.bracket_choice(0, 40)["test"].to_list()


@pytest.mark.parametrize("task, build", [("demo_cloze_choice", tasks.cloze_choice),
                                         ("demo_bracket_choice", tasks.bracket_choice)])
def test_lm_eval_scores_every_multiple_choice_document(offline, untrained_demo_lm, task, build):
    from lm_eval import simple_evaluate

    documents = build(seed=3, documents=6)["test"].to_list()
    out = simple_evaluate(model=untrained_demo_lm, tasks=[task],
                          task_manager=task_manager(seed=3, documents=6), log_samples=True)
    samples = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
    assert [sample["doc"] for sample in samples] == documents
    assert [sample["target"] for sample in samples] == [document["gold"] for document in documents]
    for sample, document in zip(samples, documents):
        # lm-eval's log-likelihood request per choice: (context, " " + choice), as LAMBADA's.
        assert [tuple(argument) for argument in sample["arguments"]] == [
            (document["context"], f" {choice}") for choice in document["choices"]]
    accuracy = np.mean([sample["acc"] for sample in samples])
    assert out["results"][task]["acc,none"] == pytest.approx(accuracy)


def test_lm_eval_scores_every_close_brackets_document(offline, untrained_demo_lm):
    from lm_eval import simple_evaluate

    documents = tasks.close_brackets(seed=3, documents=6)["test"].to_list()
    out = simple_evaluate(model=untrained_demo_lm, tasks=["demo_close_brackets"],
                          task_manager=task_manager(seed=3, documents=6), log_samples=True)
    samples = sorted(out["samples"]["demo_close_brackets"], key=lambda sample: sample["doc_id"])
    assert [sample["doc"] for sample in samples] == documents
    assert [sample["target"] for sample in samples] == [document["target"] for document in documents]
    for sample, document in zip(samples, documents):
        context, generation_kwargs = sample["arguments"][0]
        assert context == document["context"]
        assert generation_kwargs["until"][:2] == [" ;", ";"] and generation_kwargs["do_sample"] is False
        (prediction,) = sample["filtered_resps"]
        assert sample["exact_match"] == float(prediction == document["target"])
