"""Model comparison: layer curves of layer sweeps and their controls, best-layer and alpha-edge maps
(:mod:`.layer_curve`, :mod:`.alpha_edge`, :mod:`.artifacts`), and the comparison of the analyses of one
dataset version (:mod:`.comparison`)."""
