"""How results are written: atomic file output (``atomic``) and the evidence recorded with every result
(``evidence``). The bottom layer beside errors: used by data, training and experiments, imports neither."""
