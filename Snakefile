# routelab: Mixture-of-Experts routing experiments, one run per (routing config, dataset).
# The default config is the built-in CPU demo; see README.md and config/README.md.

from snakemake.utils import min_version

min_version("9.0")


# The demo config is the default; `--configfile FILE` replaces it with another complete experiment
# (instead of Snakemake's usual merge, which would leak the demo's datasets into it).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"



report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/tracking.smk"
include: "workflow/rules/demo_model.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/route.smk"
include: "workflow/rules/plot.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
