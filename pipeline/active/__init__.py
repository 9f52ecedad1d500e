"""Active learning: acquisition, the suggest command and the labelling loop."""
