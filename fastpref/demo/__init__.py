"""``fastpref demo``: a toy preference world (``world``) and the label-flip study run on it
through fastpref's trainer (``study``)."""
