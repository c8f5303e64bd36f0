"""lm-eval tasks through routelab: found and read offline (or refused before any model runs), and with the
model's own top-k equal to plain lm-eval (``simple_evaluate`` with the model path) sample for sample;
every forward lm-eval makes is recorded, generation's decode steps included."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from routelab.data.tasks import TaskError, prepare_task, task_data, task_spec
from routelab.model.patching import install_router
from routelab.record import Recording, RoutingRecorder
from routelab.routing import build_router
from routelab.run.generation import ForwardLog
from routelab.run.tasks import evaluate_task, sample_scores, task_metrics
from tests.support.models import TINY_OLMOE, load_tiny, seed_everything

TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
doc_to_text: context
"""
CHOICE_TASK = TASK + """
output_type: multiple_choice
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""
GENERATE_TASK = TASK + """
output_type: generate_until
doc_to_target: target
generation_kwargs: {{until: [" ."], max_gen_toks: 5, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""
CONTEXTS = ["the cat sat on the", "anna found an old lamp in the attic . anna gave ben back the",
            "a dog", "the kettle sang while the cat slept under the", "ben saw the", "the sailor waits near the"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder of task YAMLs whose data are JSON Lines files the test writes (no hub)."""
    folder = tmp_path_factory.mktemp("tasks")
    choice = [{"context": c, "choices": ["lamp", "kettle", "cat", "river"], "gold": i % 4}
              for i, c in enumerate(CONTEXTS)]
    generate = [{"context": c, "target": " lamp"} for c in CONTEXTS]
    for name, rows, template in (("tiny_choice", choice, CHOICE_TASK), ("tiny_generate", generate, GENERATE_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(template.format(name=name, data=data))
    (folder / "tiny_hub.yaml").write_text(CHOICE_TASK.format(name="tiny_hub", data="x").replace(
        "dataset_path: json", "dataset_path: routelab-tests/not-in-any-cache"))
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from routelab.demo.corpus import generate
    from routelab.demo.model import train_tokenizer

    tokenizer = train_tokenizer(generate("cloze", "train", 40) + generate("grammar", "train", 40), vocab_size=300)
    seed_everything(0)
    config = OlmoeConfig(**{**TINY_OLMOE, "vocab_size": len(tokenizer), "max_position_embeddings": 128},
                         norm_topk_prob=False, initializer_range=0.2)
    path = tmp_path_factory.mktemp("model")
    OlmoeForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def spec(task_dir, task, **extra):
    return task_spec({"source": "lm_eval", "task": task, "include_path": task_dir, **extra})


def test_prepare_writes_one_row_per_document_lm_eval_evaluates(task_dir, tmp_path):
    info = prepare_task(spec(task_dir, "tiny_choice", limit=4), tmp_path)
    documents = pd.read_parquet(tmp_path / "documents.parquet")
    assert documents["text"].tolist() == CONTEXTS[:4]
    assert documents["task_doc_id"].tolist() == [0, 1, 2, 3]
    task = info["tasks"]["tiny_choice"]
    assert (task["output_type"], task["documents"]) == ("multiple_choice", 4)
    assert task["higher_is_better"] == {"acc": True, "acc_norm": True}
    assert not info["generates"]
    assert prepare_task(spec(task_dir, "tiny_generate"), tmp_path / "g")["generates"]
    assert pd.read_parquet(tmp_path / "windows.parquet").empty


def test_an_unknown_task_is_refused_naming_it(task_dir, tmp_path):
    with pytest.raises(TaskError, match=r"task: 'no_such_task_anywhere' is not among lm-eval's tasks or the task "
                                         r"YAMLs of .*lm-eval ls tasks"):
        prepare_task(spec(task_dir, "no_such_task_anywhere"), tmp_path)


def test_task_data_not_in_the_local_copies_is_refused_with_how_to_fetch_it(task_dir, tmp_path):
    with pytest.raises(TaskError, match=r"the data of lm-eval task 'tiny_hub' is not available offline .*"
                                         r"snakemake download"):
        prepare_task(spec(task_dir, "tiny_hub"), tmp_path, cache=tmp_path / "empty_cache")


def test_task_data_restores_the_hub_settings(tmp_path):
    import datasets
    import huggingface_hub.constants as hub

    before = (datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_CACHE)
    with task_data(tmp_path) as cache:
        assert datasets.config.HF_DATASETS_OFFLINE and hub.HF_HUB_OFFLINE
        assert datasets.config.HF_DATASETS_CACHE == cache / "datasets"
    assert (datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_CACHE) == before


def test_unknown_options_are_refused_naming_them(task_dir):
    with pytest.raises(TaskError, match=r"options: batch_size not valid.*system_instruction"):
        spec(task_dir, "tiny_choice", options={"batch_size": 4})


def plain_lm_eval(model_dir, task_dir, task):
    """lm-eval alone, from the model's path, as a user would run it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with task_data():
        return simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu",
                               tasks=[task], batch_size=4, task_manager=TaskManager(include_path=task_dir),
                               log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                               fewshot_random_seed=1234, use_cache=None, cache_requests=False)


def routed_lm_eval(model_dir, task_dir, task, routing, path):
    from transformers import AutoTokenizer

    model = load_tiny(model_dir, "eager")
    router = build_router(routing, 8, 2)
    recorder = RoutingRecorder(2, 8, router.min_k, router.max_k, path=path)
    forwards = ForwardLog(Recording(recorder))
    with install_router(model, router, forwards.recording):
        results = evaluate_task(model, AutoTokenizer.from_pretrained(model_dir), spec(task_dir, task), forwards,
                                batch_size=4)
    recorder.close()
    return results, forwards, pq.read_table(path).to_pandas()


@pytest.mark.parametrize("task", ["tiny_choice", "tiny_generate"])
def test_model_topk_through_routelab_equals_plain_lm_eval_sample_for_sample(model_dir, task_dir, tmp_path, task):
    plain = plain_lm_eval(model_dir, task_dir, task)
    routed, _, _ = routed_lm_eval(model_dir, task_dir, task, {"method": "topk", "k": 2}, tmp_path / "r.parquet")
    mine = sorted(routed["samples"][task], key=lambda s: s["doc_id"])
    theirs = sorted(plain["samples"][task], key=lambda s: s["doc_id"])
    assert len(mine) == len(theirs) == len(CONTEXTS)
    for a, b in zip(mine, theirs):
        assert a["doc_id"] == b["doc_id"]
        if task == "tiny_generate":
            assert a["filtered_resps"] == b["filtered_resps"]  # the generated text
        else:  # (log-likelihood, is greedy) of each choice
            assert [r[1] for r in a["filtered_resps"]] == [r[1] for r in b["filtered_resps"]]
            assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], rel=1e-6)
        for metric in plain["higher_is_better"][task]:
            assert a[metric] == b[metric]
    for key, value in plain["results"][task].items():
        expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-6)
        assert routed["results"][task][key] == expected, key


def test_every_forward_of_a_multiple_choice_task_is_recorded_per_request(model_dir, task_dir, tmp_path):
    results, forwards, rows = routed_lm_eval(model_dir, task_dir, "tiny_choice",
                                             {"method": "topp", "p": 0.5, "min_k": 1, "max_k": 4},
                                             tmp_path / "r.parquet")
    layer0 = rows[rows["layer"] == 0]
    assert set(layer0["phase"].astype(str)) == {"prefill"}
    # one request per (document, choice); lm-eval scores each on context + choice, all but the last token
    assert layer0["window_id"].nunique() == 4 * len(CONTEXTS)
    assert sorted(layer0["doc_id"].unique()) == list(range(len(CONTEXTS)))
    assert len(layer0) == forwards.tokens["prefill"]
    for _, request in layer0.groupby("window_id"):
        assert request["position"].tolist() == list(range(len(request)))
    scores = sample_scores(results, pd.DataFrame({"doc_id": range(6), "task": "tiny_choice",
                                                  "task_doc_id": range(6)}))
    assert scores["acc"].mean() == pytest.approx(task_metrics(results)["results"]["tiny_choice"]["acc,none"])


def test_a_generative_task_records_prefill_and_decode_steps(model_dir, task_dir, tmp_path):
    results, forwards, rows = routed_lm_eval(model_dir, task_dir, "tiny_generate",
                                             {"method": "topp", "p": 0.5, "min_k": 1, "max_k": 4},
                                             tmp_path / "r.parquet")
    layer0 = rows[rows["layer"] == 0]
    assert set(layer0["phase"].astype(str)) == {"prefill", "decode"}
    assert forwards.tokens["decode"] == (layer0["phase"].astype(str) == "decode").sum() > 0
    for _, mine in layer0.groupby("window_id"):
        assert mine["position"].tolist() == list(range(len(mine)))  # prompt, then each decode step's token
    prompts = layer0[layer0["phase"].astype(str) == "prefill"].groupby("doc_id").size()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert prompts.tolist() == [len(tokenizer.encode(c)) for c in CONTEXTS]
    assert results["results"]["tiny_generate"]["exact_match,none"] >= 0


def test_a_route_job_on_a_task_writes_the_run_files(model_dir, task_dir, tmp_path):
    from routelab.model.loading import ModelPlacement
    from routelab.run.route import RouteJob, run_route

    data = tmp_path / "data" / "brackets"
    prepare_task(spec(task_dir, "tiny_generate"), data)
    out = tmp_path / "run"
    run_route(RouteJob(model=model_dir, data=data, out=out, routing={"name": "tp", "method": "topp", "p": 0.5,
                                                                      "max_k": 4},
                       placement=ModelPlacement(device="cpu"), batch_size=4, sample_every=5))
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["task"], metrics["primary_metric"], metrics["primary_higher_is_better"]) == (
        "lm_eval", "exact_match", True)
    assert metrics["exact_match"] == metrics["lm_eval"]["results"]["tiny_generate"]["exact_match,none"]
    system = json.loads((out / "system.json").read_text())
    routing = pq.read_table(out / "routing.parquet").to_pandas()
    assert system["decode_tokens"] * 2 == (routing["phase"].astype(str) == "decode").sum() > 0
    decisions = pq.read_table(out / "decisions.parquet").to_pandas()
    assert len(decisions) == 2 * -(-(system["prefill_tokens"] + system["decode_tokens"]) // 5)  # every 5th token
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_layer"][0]["decisions"] == system["prefill_tokens"] + system["decode_tokens"]
    assert not (tmp_path / "run.partial").exists()


def test_a_teacher_forced_rule_on_a_generating_task_stops_before_the_model_loads(model_dir, task_dir, tmp_path,
                                                                                   monkeypatch):
    from routelab.model.loading import ModelPlacement
    from routelab.run.route import RouteJob, run_route

    data = tmp_path / "data"
    prepare_task(spec(task_dir, "tiny_generate"), data)
    monkeypatch.setattr(ModelPlacement, "load", lambda *args: pytest.fail("the model was loaded"))
    job = RouteJob(model=model_dir, data=data, out=tmp_path / "run",
                   routing={"name": "seq", "method": "seqtopk", "budget": 2, "max_k": 4})
    with pytest.raises(Exception, match=r"'seqtopk'.*teacher-forced.*cannot route lm-eval task 'tiny_generate'"):
        run_route(job)


def test_lm_evals_environment_report_is_skipped_and_put_back_even_after_an_error():
    import lm_eval.evaluator

    from routelab.run.tasks import _without_env_info

    original = lm_eval.evaluator.add_env_info
    with pytest.raises(RuntimeError, match="inside"), _without_env_info():
        storage: dict = {}
        lm_eval.evaluator.add_env_info(storage)
        assert storage == {}  # nothing collected: no pip / conda subprocesses
        raise RuntimeError("inside")
    assert lm_eval.evaluator.add_env_info is original
