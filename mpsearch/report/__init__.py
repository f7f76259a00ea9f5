"""`mpsearch report`: a study's results as pictures.

One self-contained HTML page (figures embedded as PNG data, no remote resources, opens offline)
and the same figures as PNG files:

* ``loss_by_trial.png``: every trial's loss against its number, the best so far, the baselines;
* ``loss_by_size.png``: loss against size for every trial, the Pareto front and the budget;
* ``best_plan.png``: the best plan's bits per layer, grouped by block, over each layer's sensitivity;
* ``top_k_bits.png``: how the best ``k`` plans spread each layer's bits (where the search is sure);

and the baselines table. :func:`gather` reads a study; :func:`render` makes the figures and the
page; :func:`write_report` writes them (the CLI), :func:`report_html` returns the page (the API).
"""

from mpsearch.report._data import StudyData, gather
from mpsearch.report._page import FIGURES, Report, render, report_html, write_report

__all__ = ["FIGURES", "Report", "StudyData", "gather", "render", "report_html", "write_report"]
