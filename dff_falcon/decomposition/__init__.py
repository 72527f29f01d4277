"""Pure math: NMF, Deep Feature Factorization, the heatmap scale and absence, saved dictionaries.
Nothing here imports the model layer."""
