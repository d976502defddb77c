"""The evaluate step's measurements: reconstruction, codes, priors, feature-space distances."""
