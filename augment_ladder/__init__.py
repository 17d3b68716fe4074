"""cycdata.augment_ladder: augmentation ops with a magnitude in [0, 1], rungs and ladders."""
