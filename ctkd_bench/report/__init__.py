"""Paper tables, figures and an index from a results folder: ``write_report(RESULTS_DIR, OUT_DIR)``.

Every number comes from one frame, :func:`ctkd_bench.results.to_frame` of the records, cut into sections
(:mod:`.sections`, the model in :mod:`.frame`), tested (:mod:`.stats`), rendered (:mod:`.tables`,
:mod:`.figures`, :mod:`.findings`) and written with its index (:mod:`.index`). What it writes (see :func:`write_report`):

* the main table (``table.md/.tex/.csv``; ``table__<pair>.tex/.csv`` per pair when there are several):
  rows are the Teacher (an ``eval`` record of the pair's teacher), SFT and the other methods (finished
  runs without an ablation, or with ablation ``full``); columns are the eval sets and ``Avg.``.
  A cell is ``mean ± std``. With one training run, the mean and std are over its eval seeds (as in the
  record). With several training seeds, each run's mean counts once: the cell is the mean and sample
  std (ddof=1) of the run means. When a method has several finished records for the same training seed
  (and set), the latest (``finished_at``) is used and the others are listed as superseded in README.md.
  The best student per column is bold. A dagger marks a cell significantly worse (one-sided p < 0.05)
  than the reference method: the best on ``Avg.``, or ``baseline``. The test is a paired bootstrap over
  examples (:func:`paired_bootstrap`): examples are paired by (set, doc_id), each averaged over eval
  seeds (and over training seeds), and ``Avg.`` resamples within each set and averages the sets. Without
  a samples file it falls back to a paired bootstrap over the per-seed scores both rows share. Each test
  draws from its own ``numpy.random.default_rng(seed)``, so a p-value does not depend on the others.
  A double dagger marks a cell significantly better than SFT (the same test, SFT the other side); the
  CSV also holds the opposite test (``p_below_sft``: is SFT better?), which no mark shows.
* ablation tables (``ablations.*``; :func:`ablation_markdown` gives one method's as text; the CSV holds
  each cell's two-sided p against ``full``), a cost table (``cost.*``), figures (``scores``,
  ``cost_vs_score``, ``loss_curves`` as PNG and PDF) and ``README.md``, the index (always written),
  which opens with "What the numbers say" (:mod:`.findings`): the teacher's margin, every method
  against SFT, the reference and the ablations ranked, in words written from these cells and p-values.
"""

from ctkd_bench.report.figures import cost_score_figure, loss_figure, scores_figure
from ctkd_bench.report.frame import (
    AVG,
    TASK_ORDER,
    TASK_TITLES,
    Cell,
    Report,
    Row,
    Section,
    Table,
    paper_name,
)
from ctkd_bench.report.index import FORMATS, check_formats, write_report
from ctkd_bench.report.sections import build_report, build_sections
from ctkd_bench.report.stats import ALPHA, MIN_PAIRED, paired_bootstrap
from ctkd_bench.report.tables import (
    COST_HEADER,
    ablation_markdown,
    ablation_parts,
    cost_cells,
    cost_values,
    main_csv,
    main_markdown,
    main_tex,
    md_cell,
    teacher_margin,
    tex_cell,
    tex_escape,
)

__all__ = [
    "ALPHA",
    "AVG",
    "COST_HEADER",
    "FORMATS",
    "MIN_PAIRED",
    "TASK_ORDER",
    "TASK_TITLES",
    "Cell",
    "Report",
    "Row",
    "Section",
    "Table",
    "ablation_markdown",
    "ablation_parts",
    "build_report",
    "build_sections",
    "check_formats",
    "cost_cells",
    "cost_score_figure",
    "cost_values",
    "loss_figure",
    "main_csv",
    "main_markdown",
    "main_tex",
    "md_cell",
    "paired_bootstrap",
    "paper_name",
    "scores_figure",
    "teacher_margin",
    "tex_cell",
    "tex_escape",
    "write_report",
]
