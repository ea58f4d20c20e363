"""slidescore: score gigapixel images with overlapping patches, blend, mosaic, rank regions."""

__version__ = "0.1.0"
