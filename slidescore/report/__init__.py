"""What the specialist opens: per-sample report, batch index, quality flags, viewer helpers.

:func:`write_report` writes a sample's self-contained ``report.html`` (and the QuPath tile heat
map) and returns the data-quality flags and report summary to merge into run.json;
:func:`write_index` writes the run's ``index.html``. Grad-CAM (torch) and napari are imported
lazily, only when used.
"""

from slidescore.report.html import write_index, write_report
from slidescore.report.quality import quality_flags, sample_quality
from slidescore.report.qupath import tile_heatmap_geojson

__all__ = ["quality_flags", "sample_quality", "tile_heatmap_geojson", "write_index", "write_report"]
