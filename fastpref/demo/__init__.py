"""``fastpref demo``: a toy preference world (``world``) and the label-flip study run on it
through fastpref's trainer: its design (``config``), runs (``runs``), statistics (``stats``),
results (``summary``), tables (``tables``), plots (``plots``) and the command (``study``)."""
