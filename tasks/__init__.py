"""lm-eval task definitions of the ROUGE-L instruction sets (installed as ``ctkd_bench.tasks``)."""
