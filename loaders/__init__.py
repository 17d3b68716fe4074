"""cycdata.loaders: datasets and loaders that carry the data-side knobs."""
