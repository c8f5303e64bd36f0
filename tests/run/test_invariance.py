"""What a route job's outputs depend on besides its inputs: torch's CPU thread count and the batch size.

Stated in docs/robustness.md: the same inputs, batch size and thread count give byte-identical run files;
another batch size or thread count changes no routing decision here and floats only at float32 rounding
(a token whose router logits tie within rounding could be routed differently, so decisions are not
guaranteed identical on every model).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.route_setup import assert_same_run, load_route_script, make_model_and_data, read_run, route_args

FILES = ("routing.parquet", "decisions.parquet", "scores.parquet")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")
    model_dir, data_dir = make_model_and_data(root)
    route = load_route_script()
    threads = torch.get_num_threads()
    made = {}
    for name, batch_size, thread_count in (("b4", 4, 2), ("b4_again", 4, 2), ("b3", 3, 2), ("b4_one_thread", 4, 1)):
        route.main(route_args(model_dir, data_dir, root / name, batch_size=batch_size, threads=thread_count))
        made[name] = read_run(root / name)
    torch.set_num_threads(threads)
    return made


def test_the_same_batch_size_and_thread_count_give_identical_files(runs):
    for name in FILES:
        assert runs["b4"][name].equals(runs["b4_again"][name]), name
    for name in ("metrics.json", "summary.json"):
        assert runs["b4"][name] == runs["b4_again"][name], name


@pytest.mark.parametrize("other", ["b3", "b4_one_thread"])
def test_another_batch_size_or_thread_count_keeps_decisions_and_floats_to_rounding(runs, other):
    assert_same_run(runs["b4"], runs[other], float_tol=1e-5)
