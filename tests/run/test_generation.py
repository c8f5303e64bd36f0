"""Routing inside ``model.generate()`` with the KV cache: the model's own top-k reproduces native
generation, decode-step decisions equal those of teacher-forced scoring of the same sequence, and the
routing log records both phases with each token's position in its sequence."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from routelab.record import DecisionSampler, Recording, RoutingRecorder
from routelab.routing import ROUTERS, Selection, build_router
from routelab.routing.contract import RouterConfigError
from routelab.routing.nulls import GaussianNull
from routelab.run.generation import ForwardLog, generate_routed, token_positions
from tests.support.models import KERNELS, batch, load_tiny

NEW_TOKENS = 6


def prompts():
    """Two prompts of different lengths, left-padded as lm-eval pads prompts for generation."""
    ids = batch(seed=3, size=(2, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 1, 0  # the second prompt: 3 padding columns, then 4 tokens
    return ids, mask


def causal_routers():
    """One router of every causal rule (every registered rule but the teacher-forced ones)."""
    null = GaussianNull(num_experts=8)
    return {"topk": build_router({"method": "topk", "k": 2}, 8, 2),
            "bh": build_router({"method": "bh", "alpha": 0.5, "min_k": 1, "max_k": 4}, 8, 2, null),
            "topp": build_router({"method": "topp", "p": 0.5, "min_k": 1, "max_k": 4}, 8, 2),
            "entropy": build_router({"method": "entropy", "thresholds": [1.5, 1.8], "ks": [1, 2, 4]}, 8, 2),
            "hc": build_router({"method": "hc", "min_k": 1, "max_k": 4}, 8, 2, null),
            "minp": build_router({"method": "minp", "m": 0.5, "max_k": 4}, 8, 2),
            "ratio": build_router({"method": "ratio", "beta": 0.5, "max_k": 4}, 8, 2),
            "layerk": build_router({"method": "layerk", "ks": [1, 3], "max_k": 4}, 8, 2)}


def test_the_causal_routers_cover_every_rule_that_can_generate():
    assert set(causal_routers()) == {name for name, cls in ROUTERS.items() if not cls.teacher_forced}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_model_topk_generates_the_native_tokens(tiny_olmoe_dir, kernel, dtype):
    model = load_tiny(tiny_olmoe_dir, kernel, dtype)
    ids, mask = prompts()
    with torch.inference_mode():
        native = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=1)
    routed, forwards = generate_routed(model, build_router({"method": "topk", "k": 2}, 8, 2), ids, mask,
                                       max_new_tokens=NEW_TOKENS, pad_token_id=1)
    assert torch.equal(routed, native)
    assert forwards.tokens == {"prefill": int(mask.sum()), "decode": 2 * (NEW_TOKENS - 1)}


@pytest.mark.parametrize(("kernel", "rule"), [(kernel, "bh") for kernel in KERNELS] + [
    ("grouped_mm", rule) for rule in ("topp", "entropy", "hc", "minp", "ratio", "layerk")])
def test_variable_k_rules_generate_deterministically_on_every_kernel(tiny_olmoe_dir, kernel, rule):
    router = causal_routers()[rule]
    ids, mask = prompts()
    eager = load_tiny(tiny_olmoe_dir, "eager")
    reference, _ = generate_routed(eager, router, ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=1)
    model = load_tiny(tiny_olmoe_dir, kernel)
    first, _ = generate_routed(model, router, ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=1)
    again, _ = generate_routed(model, router, ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=1)
    assert torch.equal(first, again)
    assert torch.equal(first, reference)  # every kernel computes the same selection's output


def routing_rows(path):
    table = pq.read_table(path).to_pandas()
    table["phase"] = table["phase"].astype(str)
    return table


@pytest.mark.parametrize("rule", ["topk", "bh", "topp", "entropy", "hc", "minp", "ratio", "layerk"])
def test_decode_steps_route_as_teacher_forced_scoring_of_the_generated_sequence(tiny_olmoe_dir, tmp_path, rule):
    """With the KV cache, a decode step's token sees the same hidden states as in one forward over the
    whole sequence: a causal rule must choose the same experts for it."""
    router = causal_routers()[rule]
    model = load_tiny(tiny_olmoe_dir, "eager")
    ids = batch(seed=4, size=(1, 5))
    recorder = RoutingRecorder(2, 8, router.min_k, router.max_k, path=tmp_path / "generated.parquet")
    tokens, _ = generate_routed(model, router, ids, recording=Recording(recorder), max_new_tokens=NEW_TOKENS,
                                pad_token_id=1)
    recorder.close()
    generated = routing_rows(tmp_path / "generated.parquet")

    scored = RoutingRecorder(2, 8, router.min_k, router.max_k, path=tmp_path / "scored.parquet")
    forwards = ForwardLog(Recording(scored))
    from routelab.model.patching import install_router
    with torch.inference_mode(), install_router(model, router, forwards.recording), forwards.attach(model):
        model(input_ids=tokens[:, :-1])  # the last token generated is never fed back
    scored.close()
    teacher = routing_rows(tmp_path / "scored.parquet")

    assert sorted(set(generated["phase"])) == ["decode", "prefill"]
    assert (generated["phase"] == "decode").sum() == 2 * (NEW_TOKENS - 1)
    assert generated["position"].tolist() == teacher["position"].tolist()
    assert generated["token_id"].tolist() == teacher["token_id"].tolist() == (
        tokens[0, :-1].repeat_interleave(2).tolist())
    assert [list(e) for e in generated["experts"]] == [list(e) for e in teacher["experts"]]
    torch.testing.assert_close(torch.tensor([w for ws in generated["weights"] for w in ws]),
                               torch.tensor([w for ws in teacher["weights"] for w in ws]), rtol=1e-5, atol=1e-6)


def test_left_padded_prompts_record_positions_from_their_first_real_token(tiny_olmoe_dir, tmp_path):
    model = load_tiny(tiny_olmoe_dir, "eager")
    ids, mask = prompts()
    router = causal_routers()["bh"]
    recorder = RoutingRecorder(2, 8, router.min_k, router.max_k, path=tmp_path / "routing.parquet")
    generate_routed(model, router, ids, mask, recording=Recording(recorder), request_ids=[10, 11], doc_ids=[5, 6],
                    max_new_tokens=NEW_TOKENS, pad_token_id=1)
    recorder.close()
    rows = routing_rows(tmp_path / "routing.parquet")
    rows = rows[rows["layer"] == 0]
    for request, doc, prompt_length in ((10, 5, 7), (11, 6, 4)):
        mine = rows[rows["window_id"] == request]
        assert set(mine["doc_id"]) == {doc}
        assert mine["position"].tolist() == list(range(prompt_length + NEW_TOKENS - 1))
        assert mine["phase"].tolist() == ["prefill"] * prompt_length + ["decode"] * (NEW_TOKENS - 1)
    assert int(recorder.state()["k_hist"][0].sum()) == int(mask.sum()) + 2 * (NEW_TOKENS - 1)  # padding unrecorded


def test_token_positions_of_prefill_and_decode_by_hand():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    real, offsets = token_positions(mask, 2, 4, 0, torch.device("cpu"))
    assert real.tolist() == mask.bool().tolist() and offsets.tolist() == [-2, 0]
    # a decode step: the mask covers the 4 cached columns and the new one
    step = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    real, offsets = token_positions(step, 2, 1, 4, torch.device("cpu"))
    assert real.tolist() == [[True], [True]] and offsets.tolist() == [2, 4]
    real, offsets = token_positions(None, 2, 1, 9, torch.device("cpu"))
    assert real.all() and offsets.tolist() == [9, 9]


def test_a_teacher_forced_rule_is_refused_before_generation(tiny_olmoe_dir):
    model = load_tiny(tiny_olmoe_dir, "eager")
    router = build_router({"method": "seqtopk", "budget": 2, "min_k": 1, "max_k": 4}, 8, 2)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(RouterConfigError, match=r"'seqtopk'.*teacher-forced.*cannot route generation.*causal rule"):
        generate_routed(model, router, batch(size=(1, 4)), max_new_tokens=2)
    assert not calls


@pytest.mark.parametrize("rule", ["topk", "bh", "bh_fixed_k", "hc", "layerk"])
def test_decode_steps_recorded_in_groups_log_what_each_step_alone_logs(tiny_olmoe_dir, tmp_path, rule):
    """The recording hands decode steps to the recorders in groups (Recording.decode_group); grouped or
    step by step, the routing log, the sampled detail and the running counts are the same. ``bh_fixed_k``
    selects without p-values: the recorders compute them, from the group's logits."""
    router = causal_routers().get(rule) or build_router({"method": "bh", "alpha": 0.5, "min_k": 2, "max_k": 2}, 8,
                                                        2, GaussianNull(num_experts=8))
    model = load_tiny(tiny_olmoe_dir, "eager")
    ids, mask = prompts()
    logs = {}
    for group in (1, 3, 64):  # each step alone; groups of 3 and a partial one; all steps in one group
        recorder = RoutingRecorder(2, 8, router.min_k, router.max_k, path=tmp_path / f"routing{group}.parquet",
                                   pvalue_every=2)
        sampler = DecisionSampler(tmp_path / f"decisions{group}.parquet", 8, every_n=2,
                                  alpha=0.5 if rule.startswith("bh") else None)
        recording = Recording(recorder, sampler, decode_group=group)
        for _ in range(2):  # a second generation's prefill follows the first one's decode steps
            generate_routed(model, router, ids, mask, recording=recording, request_ids=[10, 11], doc_ids=[5, 6],
                            max_new_tokens=NEW_TOKENS, pad_token_id=1)
        recording.close()
        logs[group] = (pq.read_table(tmp_path / f"routing{group}.parquet"),
                       pq.read_table(tmp_path / f"decisions{group}.parquet"), recorder.state(), recorder.summary())
    alone = logs[1]
    assert alone[0].num_rows == 2 * 2 * (int(mask.sum()) + 2 * (NEW_TOKENS - 1))
    assert alone[1].num_rows > 0
    for group in (3, 64):
        routing, decisions, state, summary = logs[group]
        assert routing.equals(alone[0]) and decisions.equals(alone[1])
        for name in ("k_hist", "expert_counts", "top1_counts"):
            np.testing.assert_array_equal(state[name], alone[2][name])
        for name in ("p_moments", "router_sums", "router_probs"):  # float sums over other groupings of tokens
            np.testing.assert_allclose(state[name], alone[2][name], rtol=1e-6)
        flat = {name: value for name, value in summary.items() if isinstance(value, (int, float))}
        assert flat == pytest.approx({name: alone[3][name] for name in flat}, rel=1e-6)
        assert (summary["pvalue_mean"] is not None) == (rule not in ("topk", "layerk"))  # p-value moments compared


class BatchProbe:
    """A recorder that keeps what each batch it is handed holds: its tokens, phase and layers."""

    def __init__(self):
        self.batches = []

    def begin_batch(self, batch):
        self.batches.append([batch.real_tokens, batch.phase, batch.doc_ids.tolist(), []])

    def record(self, layer, router_logits, selection):
        self.batches[-1][3].append((layer, router_logits.shape[0], selection.k.shape[0]))

    def end_batch(self):
        pass

    def close(self):
        pass


def test_the_recording_groups_consecutive_decode_steps_of_the_same_layers_only():
    probe = BatchProbe()
    recording = Recording(probe, decode_group=3)

    def step(doc, layers, phase="decode", length=1):
        recording.begin_batch(torch.ones(1, length), torch.tensor([doc]), torch.tensor([doc]),
                              torch.ones(1, length, dtype=torch.long), phase=phase)
        for layer in layers:
            recording.record(layer, torch.zeros(length, 8), Selection(torch.zeros(length, 2, dtype=torch.long),
                                                                      torch.zeros(length, 2),
                                                                      torch.full((length,), 2)))
        recording.end_batch()

    step(0, [0, 1], "prefill", length=4)
    for doc in (1, 2, 3, 4):  # three steps make a group; the fourth waits
        step(doc, [0, 1])
    assert [b[2] for b in probe.batches] == [[0], [1, 2, 3]]
    step(5, [1])  # other layers: its own group
    step(6, [1])
    step(7, [0, 1], "decode", length=2)  # a step of two tokens is handed on alone, after the waiting ones
    recording.close()
    assert [(b[0], b[1], b[2]) for b in probe.batches] == [
        (4, "prefill", [0]), (3, "decode", [1, 2, 3]), (1, "decode", [4]), (2, "decode", [5, 6]),
        (2, "decode", [7])]
    assert probe.batches[1][3] == [(0, 3, 3), (1, 3, 3)] and probe.batches[3][3] == [(1, 2, 2)]
    assert recording.tokens_seen == 4 + 6 + 2


def test_decode_group_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"decode_group: 0 is not valid; need an integer >= 1"):
        Recording(decode_group=0)
