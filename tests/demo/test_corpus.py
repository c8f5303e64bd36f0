"""The demo corpus: deterministic, disjoint splits, domains that mean what they say."""

from __future__ import annotations

import pytest

from routelab.demo import corpus as demo_corpus


def test_demo_corpus_is_deterministic_and_splits_are_disjoint():
    for domain in demo_corpus.DOMAINS:
        eval_docs = demo_corpus.generate(domain, "eval", 20, seed=3)
        assert eval_docs == demo_corpus.generate(domain, "eval", 20, seed=3)
        assert demo_corpus.generate(domain, "eval", 5, seed=3, start=10) == eval_docs[10:15]
        assert not set(eval_docs) & set(demo_corpus.generate(domain, "calibration", 20, seed=3))
        assert eval_docs != demo_corpus.generate(domain, "eval", 20, seed=4)


def test_demo_cloze_target_appears_earlier_in_the_passage():
    for text in demo_corpus.generate("cloze", "eval", 50):
        context, _, last = text.rpartition(" ")
        assert f" {last} " in context


def test_demo_arithmetic_is_correct():
    for text in demo_corpus.generate("arithmetic", "eval", 20):
        for equation in text.split(" . "):
            left, right = equation.rstrip(" .").split(" = ")
            assert eval(left) == int(right)  # noqa: S307 - generated digits and + - * only


def test_unknown_demo_domain_is_named():
    with pytest.raises(ValueError, match="domain: 'poetry'"):
        demo_corpus.generate("poetry", "eval", 1)
