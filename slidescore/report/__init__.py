"""What the specialist opens: per-sample report, batch index, quality flags, viewer helpers.

:func:`render_report` writes a sample's self-contained ``report.html`` (and the QuPath tile heat
map) and returns the data-quality flags and report summary its run record adds (:func:`write_report`:
the same for a run.json's dict, returning dicts);
:func:`write_sample_report` writes the page of a sample of several images (its regions ranked
across them); :func:`write_index` writes the run's ``index.html`` (local or object store).
Grad-CAM (torch) and napari are imported lazily, only when used.
"""

from slidescore.report.html import ReportAdded, SampleParts, render_report, write_report
from slidescore.report.index import write_index
from slidescore.report.quality import check_quality, quality_flags, sample_quality
from slidescore.report.qupath import tile_heatmap_geojson
from slidescore.report.sample_page import write_sample_report

__all__ = ["ReportAdded", "SampleParts", "check_quality", "quality_flags", "render_report", "sample_quality",
           "tile_heatmap_geojson", "write_index", "write_report", "write_sample_report"]
