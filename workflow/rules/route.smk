# route: one job per (routing config, dataset); a dataset with `shards: N` > 1 runs N route_shard jobs
# (whole documents each) and gather_shards merges them into the same run files. With
# `evaluation.route_jobs: per_routing`, route_datasets runs one routing config on every unsharded dataset
# in one process (the same run files; it saves the interpreter and library start-up of each run, which
# outweighs the work of a small run such as the demo's).
#
# Batch size, checkpoint interval and attempt are resources, not params: they do not change the results
# (beyond float rounding), so changing them does not make finished runs stale. `retries`: every attempt
# resumes from the run's checkpoint (results/.../{dataset}.partial/, not an output, so it survives a
# failed attempt) at the batch size of its saved chunks, halved only on evidence that the previous
# attempt ran out of memory; after any other error the retry stops at once (see routelab.run.resume).
# attempt.sh keeps each attempt's log (LOG.attemptN) and tells the next attempt how the last one ended.

rule route:
    input:
        model_dir,
        windows="results/{experiment}/data/{dataset}/windows.parquet",
        documents="results/{experiment}/data/{dataset}/documents.parquet",
        info="results/{experiment}/data/{dataset}/info.json",
        null=null_input,
        calibration=calibration_input,
    output:
        metrics="results/{experiment}/runs/{routing}/{dataset}/metrics.json",
        summary="results/{experiment}/runs/{routing}/{dataset}/summary.json",
        routing="results/{experiment}/runs/{routing}/{dataset}/routing.parquet",
        scores="results/{experiment}/runs/{routing}/{dataset}/scores.parquet",
        provenance="results/{experiment}/runs/{routing}/{dataset}/provenance.json",
        system="results/{experiment}/runs/{routing}/{dataset}/system.json",
        decisions="results/{experiment}/runs/{routing}/{dataset}/decisions.parquet",
        explorer="results/{experiment}/runs/{routing}/{dataset}/explorer.parquet",
    wildcard_constraints:
        dataset=one_of(ROUTED_ALONE),
    log:
        "logs/{experiment}/route/{routing}/{dataset}.log",
    benchmark:
        "benchmarks/{experiment}/route/{routing}/{dataset}.tsv"
    params:
        model=model_ref,
        routing=routing_spec,
        null=null_arg,
        calibration=calibration_arg,
        sample_every=config["evaluation"]["decision_sample_every"],
        explorer_documents=config["evaluation"]["explorer_documents"],
        options=model_options(),
        seed=config["seed"],
        shard="",
        data=data_dirs,
        out="results/{experiment}/runs/{routing}/{dataset}",
    threads: 1
    # Above plot_run: the aggregate (after the last route job) then overlaps the plots instead of
    # following them; use rule ... with inherits it (route_datasets, route_shard).
    priority: 20
    resources:
        gpu=config["model"]["gpus"],
        batch_size=route_batch_size,
        checkpoint_every=config["evaluation"]["checkpoint_every"],
        attempt=route_attempt,
    retries: 3
    conda:
        "../../envs/routelab.yaml"
    shell:
        "workflow/scripts/attempt.sh {log} {resources.attempt}"
        " python workflow/scripts/route.py --model {params.model:q} --routing {params.routing:q} {params.null}"
        " {params.calibration}"
        " --data {params.data}"
        " --batch-size {resources.batch_size} --checkpoint-every {resources.checkpoint_every}"
        " --attempt {resources.attempt} --sample-every {params.sample_every}"
        " --explorer-documents {params.explorer_documents} {params.options}"
        " --seed {params.seed} --threads {threads} {params.shard} --out {params.out}"


if ROUTED_TOGETHER and FULL_ROUTINGS:

    use rule route as route_datasets with:
        input:
            model_dir,
            windows=together_data("windows.parquet"),
            documents=together_data("documents.parquet"),
            info=together_data("info.json"),
            null=null_input,
            calibration=calibration_input,
        output:
            metrics=together_runs("metrics.json"),
            summary=together_runs("summary.json"),
            routing=together_runs("routing.parquet"),
            scores=together_runs("scores.parquet"),
            provenance=together_runs("provenance.json"),
            system=together_runs("system.json"),
            decisions=together_runs("decisions.parquet"),
            explorer=together_runs("explorer.parquet"),
        wildcard_constraints:
            routing=one_of(FULL_ROUTINGS),
        log:
            "logs/{experiment}/route/{routing}.log",
        benchmark:
            "benchmarks/{experiment}/route/{routing}.tsv"
        params:
            out=together_runs(""),


# A teacher-forced routing config (seqtopk) skips the lm-eval tasks that generate: its job routes the rest.
if together_data("info.json", CAUSAL_ONLY_DATASETS) and PARTIAL_ROUTINGS:

    use rule route as route_datasets_causal_only with:
        input:
            model_dir,
            windows=together_data("windows.parquet", CAUSAL_ONLY_DATASETS),
            documents=together_data("documents.parquet", CAUSAL_ONLY_DATASETS),
            info=together_data("info.json", CAUSAL_ONLY_DATASETS),
            null=null_input,
            calibration=calibration_input,
        output:
            metrics=together_runs("metrics.json", CAUSAL_ONLY_DATASETS),
            summary=together_runs("summary.json", CAUSAL_ONLY_DATASETS),
            routing=together_runs("routing.parquet", CAUSAL_ONLY_DATASETS),
            scores=together_runs("scores.parquet", CAUSAL_ONLY_DATASETS),
            provenance=together_runs("provenance.json", CAUSAL_ONLY_DATASETS),
            system=together_runs("system.json", CAUSAL_ONLY_DATASETS),
            decisions=together_runs("decisions.parquet", CAUSAL_ONLY_DATASETS),
            explorer=together_runs("explorer.parquet", CAUSAL_ONLY_DATASETS),
        wildcard_constraints:
            routing=one_of(PARTIAL_ROUTINGS),
        log:
            "logs/{experiment}/route/{routing}.log",
        benchmark:
            "benchmarks/{experiment}/route/{routing}.tsv"
        params:
            out=together_runs("", CAUSAL_ONLY_DATASETS),


use rule route as route_shard with:
    output:
        routing=temp("results/{experiment}/shards/{routing}/{dataset}/{shard}/routing.parquet"),
        decisions=temp("results/{experiment}/shards/{routing}/{dataset}/{shard}/decisions.parquet"),
        explorer=temp("results/{experiment}/shards/{routing}/{dataset}/{shard}/explorer.parquet"),
        scores=temp("results/{experiment}/shards/{routing}/{dataset}/{shard}/scores.parquet"),
        state=temp("results/{experiment}/shards/{routing}/{dataset}/{shard}/accumulators.npz"),
        part=temp("results/{experiment}/shards/{routing}/{dataset}/{shard}/part.json"),
    wildcard_constraints:
        dataset=one_of(SHARDED),
        shard=r"[0-9]+-of-[0-9]+",
    log:
        "logs/{experiment}/route/{routing}/{dataset}/{shard}.log",
    benchmark:
        "benchmarks/{experiment}/route/{routing}/{dataset}/{shard}.tsv"
    params:
        shard="--shard {shard}",
        out="results/{experiment}/shards/{routing}/{dataset}/{shard}",


rule gather_shards:
    input:
        parts=shard_parts,
        info="results/{experiment}/data/{dataset}/info.json",
    output:
        metrics="results/{experiment}/runs/{routing}/{dataset}/metrics.json",
        summary="results/{experiment}/runs/{routing}/{dataset}/summary.json",
        routing="results/{experiment}/runs/{routing}/{dataset}/routing.parquet",
        scores="results/{experiment}/runs/{routing}/{dataset}/scores.parquet",
        provenance="results/{experiment}/runs/{routing}/{dataset}/provenance.json",
        system="results/{experiment}/runs/{routing}/{dataset}/system.json",
        decisions="results/{experiment}/runs/{routing}/{dataset}/decisions.parquet",
        explorer="results/{experiment}/runs/{routing}/{dataset}/explorer.parquet",
    wildcard_constraints:
        dataset=one_of(SHARDED),
    log:
        "logs/{experiment}/gather_shards/{routing}/{dataset}.log",
    params:
        parts=shard_dirs,
    threads: 1
    priority: 20
    conda:
        "../../envs/routelab.yaml"
    shell:
        "python workflow/scripts/gather_shards.py --parts {params.parts}"
        " --data results/{wildcards.experiment}/data/{wildcards.dataset}"
        " --out results/{wildcards.experiment}/runs/{wildcards.routing}/{wildcards.dataset} > {log} 2>&1"
