"""Reading, summarising and plotting a run's logs: what ``lightning-clip report`` prints and draws.

* [`load`][lightning_clip.report.load]: ``metrics.csv``, TensorBoard event files and the event log
  into a [`RunData`][lightning_clip.report.RunData];
* [`summary`][lightning_clip.report.summary]: [`summarize`][lightning_clip.report.summarize] and
  [`format_summary`][lightning_clip.report.format_summary];
* [`plot`][lightning_clip.report.plot]: the figures (matplotlib, the ``plot`` extra, imported only when
  a figure is drawn);
* [`cli`][lightning_clip.report.cli]: the ``lightning-clip`` console script.

None of them imports torch or Lightning.

Examples:
    >>> import os, tempfile
    >>> from lightning_clip import report
    >>> run_dir = tempfile.mkdtemp()
    >>> with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
    ...     _ = f.write("grad/norm,grad/clip_coef,step\\n2.0,1.0,0\\n4.0,0.5,1\\n")
    >>> summary = report.summarize(report.load_run(run_dir))
    >>> summary.norms[0].p50, summary.norms[0].clip_rate
    (3.0, 0.5)
"""

from lightning_clip.report.load import (
    ReportError,
    RunData,
    load_events,
    load_metrics_csv,
    load_run,
    load_tensorboard,
)
from lightning_clip.report.plot import plot_gradient_flow, plot_norms, write_figures
from lightning_clip.report.summary import NormSummary, RunSummary, format_summary, percentile, summarize

__all__ = [
    "NormSummary",
    "ReportError",
    "RunData",
    "RunSummary",
    "format_summary",
    "load_events",
    "load_metrics_csv",
    "load_run",
    "load_tensorboard",
    "percentile",
    "plot_gradient_flow",
    "plot_norms",
    "summarize",
    "write_figures",
]
